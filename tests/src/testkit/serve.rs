//! `lb-testkit serve`: a backend that names itself in every answer.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};

/// Upper bound of a request head; anything longer is answered anyway.
const MAX_REQUEST: usize = 16 * 1024;
/// How long a connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Body of the HTTP answer of backend `name`.
pub fn http_body(name: &str) -> String {
    format!("<h1>This request was processed by host: {name}</h1>\n")
}

/// Serves HTTP/1.1 on `listen` until killed.
pub fn http(listen: SocketAddr, name: &str) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding TCP {listen}"))?;
    announce()?;
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let name = name.to_owned();
                thread::spawn(move || {
                    if let Err(err) = answer(stream, &name) {
                        eprintln!("lb-testkit serve: {err}");
                    }
                });
            }
            Err(err) => eprintln!("lb-testkit serve: accept: {err}"),
        }
    }
    Ok(())
}

fn answer(mut stream: TcpStream, name: &str) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    read_request_head(&mut stream)?;
    let body = http_body(name);
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nX-Remote-Addr: {peer}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// Reads until the blank line ending the request head, EOF, or [`MAX_REQUEST`] bytes.
fn read_request_head(stream: &mut TcpStream) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    Ok(())
}

/// Answers every datagram on `listen` with `NAME <peer ip:port>` until killed.
pub fn udp(listen: SocketAddr, name: &str) -> Result<()> {
    let socket = UdpSocket::bind(listen).with_context(|| format!("binding UDP {listen}"))?;
    announce()?;
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if let Err(err) = socket.send_to(format!("{name} {peer}").as_bytes(), peer) {
                    eprintln!("lb-testkit serve: send to {peer}: {err}");
                }
            }
            Err(err) => eprintln!("lb-testkit serve: recv: {err}"),
        }
    }
}

/// Tells the harness the socket is bound.
fn announce() -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "listening")?;
    out.flush()?;
    Ok(())
}
