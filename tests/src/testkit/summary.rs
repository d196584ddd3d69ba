//! The JSON line `lb-testkit client` prints, shared with the fixtures that parse it.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr};

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

/// What `lb-testkit client` saw over all its connections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientSummary {
    /// Requests answered with status 200.
    pub ok: u32,
    /// Failures by name: errors of `connect()` (TCP, connected UDP) or of `sendto()` (unconnected
    /// UDP) by errno name (`ECONNREFUSED`, `ETIMEDOUT`, ...); failures after that step carry a
    /// `request:` prefix (`request:ECONNRESET`, `request:ETIMEDOUT` for a UDP answer that never
    /// came, `request:bad-response`); a socket that could not be made, `socket:`.
    pub errors: BTreeMap<String, u32>,
    /// Successful requests per backend name.
    pub hosts: BTreeMap<String, u32>,
    /// The client address the backend saw, for each successful request (`X-Remote-Addr`, or the
    /// peer in a UDP answer).
    pub remote_addrs: Vec<String>,
    /// The peer the client's own socket reports, for each successful request: `getpeername()`
    /// (TCP, connected UDP), or the source address `recvfrom()` gave the answer (unconnected
    /// UDP). With socket-level load balancing this is the Service address dialled.
    #[serde(default)]
    pub peer_addrs: Vec<String>,
    /// Duration of every connect, successful or not, in milliseconds (UDP: one per socket, its
    /// `connect()`, or its first `sendto()` when unconnected).
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
    /// Index of the socket (TCP: of the connection) the request went over; UDP sockets carry
    /// `--sends` requests each.
    #[serde(default)]
    pub socket: u32,
    /// The peer the socket reported (see [`ClientSummary::peer_addrs`]), on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
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

    /// Distinct peers the client's sockets reported ([`ClientSummary::peer_addrs`]).
    pub fn peers(&self) -> BTreeSet<&str> {
        self.peer_addrs.iter().map(String::as_str).collect()
    }

    /// Distinct client addresses (without port) the backends saw.
    #[track_caller]
    pub fn remote_ips(&self) -> BTreeSet<IpAddr> {
        self.remote_addrs
            .iter()
            .map(|a| {
                a.parse::<SocketAddr>()
                    .unwrap_or_else(|e| panic!("remote address {a:?}: {e}"))
                    .ip()
            })
            .collect()
    }

    /// Backend names that answered per socket (for UDP sockets carrying several requests).
    pub fn hosts_by_socket(&self) -> BTreeMap<u32, BTreeSet<&str>> {
        let mut by_socket: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
        for attempt in &self.attempts {
            if let Some(host) = &attempt.host {
                by_socket.entry(attempt.socket).or_default().insert(host);
            }
        }
        by_socket
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
        assert!(summary.peer_addrs.is_empty());
        assert_eq!(
            summary.remote_ips(),
            BTreeSet::from(["10.244.0.2".parse::<IpAddr>().unwrap()])
        );
    }

    #[test]
    fn helpers_group_by_socket_and_parse_v6() {
        let json = r#"{"ok":3,"errors":{},"hosts":{"a":2,"b":1},
            "remote_addrs":["[fd00:244::3]:4000","10.244.0.3:4001"],
            "peer_addrs":["10.96.0.10:53","10.96.0.10:53","10.96.0.10:53"],"connect_ms":[0.1],
            "attempts":[{"start_ns":1,"socket":0,"host":"a","peer":"10.96.0.10:53"},
                        {"start_ns":2,"socket":0,"host":"a"},{"start_ns":3,"socket":1,"host":"b"}]}"#;
        let summary: ClientSummary = serde_json::from_str(json).unwrap();
        assert_eq!(summary.peers(), BTreeSet::from(["10.96.0.10:53"]));
        assert_eq!(summary.remote_ips().len(), 2);
        let by_socket = summary.hosts_by_socket();
        assert_eq!(by_socket[&0], BTreeSet::from(["a"]));
        assert_eq!(by_socket[&1], BTreeSet::from(["b"]));
    }
}
