//! The JSON line `lb-testkit client` prints, shared with the fixtures that parse it.

use std::collections::BTreeMap;
use std::io;

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

/// What `lb-testkit client` saw over all its connections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientSummary {
    /// Requests answered with status 200.
    pub ok: u32,
    /// Failures by name: connect errors by errno name (`ECONNREFUSED`, `ETIMEDOUT`, ...); failures
    /// after the connect succeeded carry a `request:` prefix (`request:ECONNRESET`,
    /// `request:bad-response`).
    pub errors: BTreeMap<String, u32>,
    /// Successful requests per backend name.
    pub hosts: BTreeMap<String, u32>,
    /// `X-Remote-Addr` of each successful request: the client address the backend saw.
    pub remote_addrs: Vec<String>,
    /// Duration of every connect, successful or not, in milliseconds.
    pub connect_ms: Vec<f64>,
    /// Every connection in order.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
}

/// One connection of a client run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// `CLOCK_MONOTONIC` (system-wide) in nanoseconds when the connect started.
    pub start_ns: u64,
    /// Backend name on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Error name on failure, as counted in [`ClientSummary::errors`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ClientSummary {
    /// Number of connections made.
    pub fn total(&self) -> u32 {
        self.ok + self.errors.values().sum::<u32>()
    }

    /// Requests answered by `host`.
    pub fn count(&self, host: &str) -> u32 {
        self.hosts.get(host).copied().unwrap_or(0)
    }

    /// Failures named `error`.
    pub fn errors_of(&self, error: &str) -> u32 {
        self.errors.get(error).copied().unwrap_or(0)
    }

    /// Distinct backend names that answered.
    pub fn host_names(&self) -> Vec<&str> {
        self.hosts.keys().map(String::as_str).collect()
    }
}

/// Errno name of an I/O error: `ECONNREFUSED`, `ETIMEDOUT` for timeouts, `E<num>` for numbers
/// without a name.
pub fn errno_name(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(code) if code == libc::EAGAIN => "ETIMEDOUT".to_owned(),
        Some(code) => match Errno::from_raw(code) {
            Errno::UnknownErrno => format!("E{code}"),
            errno => format!("{errno:?}"),
        },
        None if matches!(
            err.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ) =>
        {
            "ETIMEDOUT".to_owned()
        }
        None => format!("{:?}", err.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names() {
        let name = |code| errno_name(&io::Error::from_raw_os_error(code));
        assert_eq!(name(libc::ECONNREFUSED), "ECONNREFUSED");
        assert_eq!(name(libc::ENETUNREACH), "ENETUNREACH");
        assert_eq!(name(libc::EHOSTUNREACH), "EHOSTUNREACH");
        assert_eq!(name(libc::EPERM), "EPERM");
        assert_eq!(name(libc::ETIMEDOUT), "ETIMEDOUT");
        assert_eq!(name(libc::EAGAIN), "ETIMEDOUT");
        assert_eq!(name(4000), "E4000");
        assert_eq!(
            errno_name(&io::Error::from(io::ErrorKind::TimedOut)),
            "ETIMEDOUT"
        );
    }

    #[test]
    fn summary_round_trips() {
        let json = r#"{"ok":1,"errors":{"ECONNREFUSED":2},"hosts":{"a":1},"remote_addrs":["10.244.0.2:4000"],"connect_ms":[0.1,0.2,0.3]}"#;
        let summary: ClientSummary = serde_json::from_str(json).unwrap();
        assert_eq!(summary.total(), 3);
        assert_eq!(summary.count("a"), 1);
        assert_eq!(summary.errors_of("ECONNREFUSED"), 2);
        assert!(summary.attempts.is_empty());
    }
}
