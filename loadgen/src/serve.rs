//! `lb-loadgen serve`: TCP and UDP echo on all addresses of the namespace.
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Echoes TCP and UDP on the given ports; an idle TCP connection is closed after `idle`
/// (the clients close theirs; this bounds leaks).
pub fn run(tcp: Option<u16>, udp: Option<u16>, threads: usize, idle: Duration) -> Result<()> {
    if tcp.is_none() && udp.is_none() {
        bail!("nothing to serve: give --tcp PORT and/or --udp PORT");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let mut tasks = Vec::new();
        if let Some(port) = tcp {
            let listener = TcpListener::bind(any(port))
                .await
                .with_context(|| format!("binding TCP port {port}"))?;
            tasks.push(tokio::spawn(accept(listener, idle)));
        }
        if let Some(port) = udp {
            let socket = Arc::new(
                UdpSocket::bind(any(port))
                    .await
                    .with_context(|| format!("binding UDP port {port}"))?,
            );
            for _ in 0..threads.max(1) {
                tasks.push(tokio::spawn(echo_datagrams(Arc::clone(&socket))));
            }
        }
        println!("listening");
        std::io::stdout().flush()?;
        for task in tasks {
            task.await.context("a server task panicked")?;
        }
        Ok(())
    })
}

fn any(port: u16) -> SocketAddr {
    (Ipv4Addr::UNSPECIFIED, port).into()
}

async fn accept(listener: TcpListener, idle: Duration) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(echo_stream(stream, idle));
            }
            Err(error) => {
                // Out of descriptors or similar: back off instead of spinning.
                eprintln!("lb-loadgen serve: accept: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn echo_stream(mut stream: TcpStream, idle: Duration) {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 2048];
    loop {
        let read = tokio::time::timeout(idle, stream.read(&mut buf)).await;
        let n = match read {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        if stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn echo_datagrams(socket: Arc<UdpSocket>) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, peer)) => {
                let _ = socket.send_to(&buf[..n], peer).await;
            }
            Err(error) => {
                eprintln!("lb-loadgen serve: udp: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
