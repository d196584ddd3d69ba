//! Names outside the cluster domain: the query, as the client sent it, goes to the
//! resolvers of the node's `/etc/resolv.conf`, one after the other until one answers.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use hickory_proto::op::Message;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

/// How long an upstream resolver has to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The `nameserver` lines of a resolv.conf, on port 53, except `own` (lb's own listener:
/// forwarding to it would loop).
///
/// # Errors
/// When the file cannot be read.
pub fn upstreams(path: &Path, own: Option<SocketAddr>) -> io::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then_some(())?;
            // A scoped IPv6 address (`fe80::1%eth0`) keeps only its address.
            let ip: IpAddr = words.next()?.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .filter(|addr| Some(*addr) != own)
        .collect())
}

/// Sends `query` to the first upstream that answers: over TCP when `tcp` (the client used
/// TCP, typically after a truncated answer), else over UDP.
///
/// # Errors
/// When no upstream answered in time, or every answer was malformed.
pub async fn forward(upstreams: &[SocketAddr], query: &[u8], tcp: bool) -> io::Result<Message> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no upstream resolver");
    for &upstream in upstreams {
        let exchange = async {
            if tcp {
                over_tcp(upstream, query).await
            } else {
                over_udp(upstream, query).await
            }
        };
        match timeout(UPSTREAM_TIMEOUT, exchange).await {
            Ok(Ok(bytes)) => match Message::from_vec(&bytes) {
                Ok(message) => return Ok(message),
                Err(e) => last = io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            },
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("upstream {upstream} did not answer"),
                );
            }
        }
    }
    Err(last)
}

async fn over_udp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let any: IpAddr = if upstream.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((any, 0)).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buffer = vec![0; 65_535];
    loop {
        let n = socket.recv(&mut buffer).await?;
        // Only the answer to this query (same id) counts.
        if n >= 2 && query.len() >= 2 && buffer[..2] == query[..2] {
            buffer.truncate(n);
            return Ok(buffer);
        }
    }
}

async fn over_tcp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    let length = u16::try_from(query.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let length = usize::from(stream.read_u16().await?);
    let mut buffer = vec![0; length];
    stream.read_exact(&mut buffer).await?;
    Ok(buffer)
}
