//! A minimal HTTP GET from inside a test's network namespace, for the agent's health
//! endpoints (status, headers and body as the server sent them).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use crate::testkit::enter_netns;

/// One answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpAnswer {
    /// The status code; 0 when nothing answered (`body` then holds the error).
    pub status: u16,
    /// The headers, names in lowercase.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    /// The value of header `name` (lowercase).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    #[track_caller]
    #[must_use]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// `GET path` on `target` from the network namespace `netns` (2 s timeouts).
#[must_use]
pub fn get_in(netns: &str, target: SocketAddr, path: &str) -> HttpAnswer {
    let netns = netns.to_owned();
    let path = path.to_owned();
    std::thread::spawn(move || {
        enter_netns(&netns).expect("entering the namespace");
        let timeout = Duration::from_secs(2);
        let raw = TcpStream::connect_timeout(&target, timeout).and_then(|mut stream| {
            stream.set_read_timeout(Some(timeout))?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: {target}\r\n\r\n")?;
            let mut raw = String::new();
            stream.read_to_string(&mut raw)?;
            Ok(raw)
        });
        match raw {
            Ok(raw) => parse(&raw),
            Err(e) => HttpAnswer {
                status: 0,
                headers: Vec::new(),
                body: e.to_string(),
            },
        }
    })
    .join()
    .expect("HTTP client thread")
}

/// [`get_in`] until the status is `want`, for at most `timeout`; returns the last answer.
#[must_use]
pub fn wait_for_status(
    netns: &str,
    target: SocketAddr,
    path: &str,
    want: u16,
    timeout: Duration,
) -> HttpAnswer {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = get_in(netns, target, path);
        if answer.status == want || Instant::now() >= deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn parse(raw: &str) -> HttpAnswer {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    HttpAnswer {
        status,
        headers,
        body: body.to_owned(),
    }
}
