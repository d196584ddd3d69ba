//! `lb-testkit client --udp`: request/answer exchanges with `lb-testkit serve --udp`, as a DNS
//! resolver makes them, summarised as JSON.
//!
//! Each of `--count` sockets sends `--sends` datagrams one after the other and waits for each
//! answer (`NAME <peer>`). Unconnected (the default): `sendto(target)` and `recvfrom()`, whose
//! source address is the reported peer. `--connected`: `connect(target)`, `send`, `recv`, and
//! `getpeername()` is the reported peer.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use super::ClientArgs;
use super::client::{Answer, record};
use super::summary::{ClientSummary, errno_name};
use crate::clock::monotonic_ns;

/// Upper bound of an answer.
const MAX_ANSWER: usize = 2048;

/// Runs `args.count` sockets of `args.sends` exchanges each. Never fails: errors are counted.
pub fn run(args: &ClientArgs) -> ClientSummary {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let mut summary = ClientSummary::default();
    for socket_index in 0..args.count {
        if socket_index > 0 && args.interval_ms > 0 {
            thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let start_ns = monotonic_ns();
        let socket = match open(args.target, timeout) {
            Ok(socket) => socket,
            Err(err) => {
                let name = format!("socket:{}", errno_name(&err));
                for _ in 0..args.sends {
                    record(&mut summary, start_ns, socket_index, Err(name.clone()));
                }
                continue;
            }
        };
        if args.connected {
            let started = Instant::now();
            let connected = socket.connect(args.target);
            summary.connect_ms.push(millis(started));
            if let Err(err) = connected {
                for _ in 0..args.sends {
                    record(&mut summary, start_ns, socket_index, Err(errno_name(&err)));
                }
                continue;
            }
        }
        for send_index in 0..args.sends {
            let start_ns = if send_index == 0 {
                start_ns
            } else {
                if args.interval_ms > 0 {
                    thread::sleep(Duration::from_millis(args.interval_ms));
                }
                monotonic_ns()
            };
            let outcome = exchange(
                &socket,
                args,
                format!("lb-testkit {socket_index} {send_index}").as_bytes(),
                (send_index == 0 && !args.connected).then_some(&mut summary.connect_ms),
            );
            record(&mut summary, start_ns, socket_index, outcome);
        }
    }
    summary
}

/// A UDP socket of the target's family on an ephemeral port.
fn open(target: SocketAddr, timeout: Duration) -> io::Result<UdpSocket> {
    let any: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))?;
    Ok(socket)
}

/// One datagram out, one answer back. `send_ms` receives the duration of an unconnected
/// socket's `sendto` (where a Service without endpoints refuses).
fn exchange(
    socket: &UdpSocket,
    args: &ClientArgs,
    payload: &[u8],
    send_ms: Option<&mut Vec<f64>>,
) -> Result<Answer, String> {
    let request = |e: io::Error| format!("request:{}", errno_name(&e));
    let mut buf = [0u8; MAX_ANSWER];
    let (len, peer) = if args.connected {
        socket.send(payload).map_err(request)?;
        let len = socket.recv(&mut buf).map_err(request)?;
        (len, socket.peer_addr().map_err(request)?)
    } else {
        let started = Instant::now();
        let sent = socket.send_to(payload, args.target);
        if let Some(send_ms) = send_ms {
            send_ms.push(millis(started));
        }
        sent.map_err(|e| errno_name(&e))?;
        socket.recv_from(&mut buf).map_err(request)?
    };
    let mut answer =
        parse_answer(&String::from_utf8_lossy(&buf[..len])).ok_or("request:bad-response")?;
    answer.peer = Some(peer.to_string());
    Ok(answer)
}

/// Parses `NAME <peer ip:port>`, the answer of `lb-testkit serve --udp`.
fn parse_answer(text: &str) -> Option<Answer> {
    let (host, remote) = text.trim().split_once(' ')?;
    remote.parse::<SocketAddr>().ok()?;
    Some(Answer {
        host: host.to_owned(),
        remote_addr: Some(remote.to_owned()),
        peer: None,
    })
}

fn millis(started: Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_udp_answers() {
        let answer = parse_answer("dns1 10.244.0.3:41000").unwrap();
        assert_eq!(answer.host, "dns1");
        assert_eq!(answer.remote_addr.as_deref(), Some("10.244.0.3:41000"));
        let answer = parse_answer("dns1-v6 [fd00:244::3]:41000").unwrap();
        assert_eq!(answer.remote_addr.as_deref(), Some("[fd00:244::3]:41000"));
        assert!(parse_answer("dns1").is_none());
        assert!(parse_answer("dns1 nonsense").is_none());
    }
}
