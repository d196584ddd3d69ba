//! `lb-testkit client`: sequential HTTP GETs, one connection each, summarised as JSON, with the
//! `getpeername()` of each connection.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::ClientArgs;
use super::summary::{Attempt, ClientSummary, errno_name};
use crate::clock::monotonic_ns;

/// Upper bound of an answer we read.
const MAX_RESPONSE: u64 = 64 * 1024;

/// What one request returned.
pub(super) struct Answer {
    pub(super) host: String,
    pub(super) remote_addr: Option<String>,
    /// What the client's socket reports as its peer.
    pub(super) peer: Option<String>,
}

/// Makes `args.count` connections and summarises them. Never fails: errors are counted.
pub fn run(args: &ClientArgs) -> ClientSummary {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let mut summary = ClientSummary::default();
    for i in 0..args.count {
        if i > 0 && args.interval_ms > 0 {
            thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let start_ns = monotonic_ns();
        let started = Instant::now();
        let connected = TcpStream::connect_timeout(&args.target, timeout);
        summary
            .connect_ms
            .push((started.elapsed().as_secs_f64() * 1e6).round() / 1e3);
        let outcome = match connected {
            Err(err) => Err(errno_name(&err)),
            Ok(stream) => {
                // getpeername() right after the connect, as an application would log it.
                let peer = stream.peer_addr().map(|a| a.to_string());
                request(stream, args.target, timeout)
                    .map(|answer| Answer {
                        peer: peer.ok(),
                        ..answer
                    })
                    .map_err(|e| format!("request:{e}"))
            }
        };
        record(&mut summary, start_ns, i, outcome);
    }
    summary
}

/// Adds the outcome of one request to the summary.
pub(super) fn record(
    summary: &mut ClientSummary,
    start_ns: u64,
    socket: u32,
    outcome: Result<Answer, String>,
) {
    let mut attempt = Attempt {
        start_ns,
        socket,
        ..Attempt::default()
    };
    match outcome {
        Ok(answer) => {
            summary.ok += 1;
            *summary.hosts.entry(answer.host.clone()).or_default() += 1;
            if let Some(addr) = answer.remote_addr {
                summary.remote_addrs.push(addr);
            }
            if let Some(peer) = &answer.peer {
                summary.peer_addrs.push(peer.clone());
            }
            attempt.host = Some(answer.host);
            attempt.peer = answer.peer;
        }
        Err(name) => {
            *summary.errors.entry(name.clone()).or_default() += 1;
            attempt.error = Some(name);
        }
    }
    summary.attempts.push(attempt);
}

/// Sends a GET on a connected stream and parses the answer; the error is a short name.
fn request(mut stream: TcpStream, target: SocketAddr, timeout: Duration) -> Result<Answer, String> {
    let io_name = |e: io::Error| errno_name(&e);
    stream.set_read_timeout(Some(timeout)).map_err(io_name)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_name)?;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {target}\r\nUser-Agent: lb-testkit\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io_name)?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .map_err(io_name)?;
    parse_response(&String::from_utf8_lossy(&raw)).ok_or_else(|| "bad-response".to_owned())
}

/// Parses a `200` answer of `lb-testkit serve`.
fn parse_response(text: &str) -> Option<Answer> {
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?;
    if status.split_whitespace().nth(1)? != "200" {
        return None;
    }
    let remote_addr = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("x-remote-addr")
            .then(|| value.trim().to_owned())
    });
    let (_, rest) = body.split_once("processed by host: ")?;
    let (host, _) = rest.split_once("</h1>")?;
    Some(Answer {
        host: host.to_owned(),
        remote_addr,
        peer: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::serve::http_body;

    #[test]
    fn parses_server_answer() {
        let body = http_body("webapp1");
        let text = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Remote-Addr: 10.244.0.3:41000\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = parse_response(&text).unwrap();
        assert_eq!(answer.host, "webapp1");
        assert_eq!(answer.remote_addr.as_deref(), Some("10.244.0.3:41000"));
    }

    #[test]
    fn rejects_other_status() {
        assert!(parse_response("HTTP/1.1 500 Oops\r\n\r\nprocessed by host: x</h1>").is_none());
        assert!(parse_response("garbage").is_none());
    }
}
