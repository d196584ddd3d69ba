//! TCP listeners on both address families: an unspecified address (`0.0.0.0` or `::`)
//! means every address of the node, IPv4 and IPv6, as Go's listeners in kube-proxy take it;
//! and the HTTP serving of every endpoint of the agent, with a header-read timeout and a
//! connection cap.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::warn;

/// Listens on `addr`; when its IP is unspecified, on `0.0.0.0` and `[::]` (IPv6-only, so
/// the two do not collide) at its port. A host without IPv6 gets the IPv4 listener alone.
///
/// # Errors
/// When `addr` (or, for an unspecified address, the IPv4 wildcard) cannot be bound.
pub fn bind_all(addr: SocketAddr) -> io::Result<Vec<TcpListener>> {
    if !addr.ip().is_unspecified() {
        return Ok(vec![bind(addr)?]);
    }
    let v4 = bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())))?;
    // An ephemeral port (0) must be the same in both families.
    let port = v4.local_addr()?.port();
    let mut listeners = vec![v4];
    match bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
        Ok(v6) => listeners.push(v6),
        Err(e) if is_no_ipv6(&e) => warn!(port, error = %e, "no IPv6 on this host: IPv4 only"),
        Err(e) => return Err(e),
    }
    Ok(listeners)
}

fn is_no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
    )
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The limits of an HTTP server of the agent.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long a client may take to send a request's headers (a slow or idle client is
    /// dropped instead of holding a connection).
    pub header_read_timeout: Duration,
    /// How long a connection may live at all (probes and scrapes take milliseconds).
    pub connection_lifetime: Duration,
    /// Connections served at once per listener; more are closed as they come.
    pub max_connections: usize,
}

impl Limits {
    /// Those of every server of the agent.
    pub const DEFAULT: Self = Self {
        header_read_timeout: Duration::from_secs(5),
        connection_lifetime: Duration::from_secs(60),
        max_connections: 64,
    };
}

/// Serves `app` on `listener` within [`Limits::DEFAULT`] (axum's own `serve` has no
/// limits), until the task is dropped.
///
/// # Errors
/// Never in practice: accept errors (such as running out of file descriptors) are logged
/// and retried after a pause.
pub async fn serve_http(listener: TcpListener, app: axum::Router) -> io::Result<()> {
    serve_http_with(listener, app, Limits::DEFAULT).await
}

/// [`serve_http`] within `limits`.
///
/// # Errors
/// As [`serve_http`].
pub async fn serve_http_with(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            // At the cap: closed at once, costing nothing while held.
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.connection_lifetime, connection).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        time::Instant,
    };

    use super::*;

    /// What a client reads until the server closes (or 3 s pass), and how long that took.
    fn read_all(mut stream: TcpStream) -> (String, Duration) {
        let started = Instant::now();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        (text, started.elapsed())
    }

    /// A client that sends no headers is dropped after the timeout; past the cap a
    /// connection is closed at once; once the idle ones are gone, requests are served.
    #[test]
    fn idle_clients_are_dropped_and_connections_capped() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            connection_lifetime: Duration::from_secs(10),
            max_connections: 2,
        };
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let server = runtime.spawn(serve_http_with(listener, app, limits));

        let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(50));
        let (text, took) = read_all(TcpStream::connect(addr).unwrap());
        assert!(
            text.is_empty() && took < Duration::from_millis(250),
            "over the cap: {text:?} after {took:?}"
        );
        for stream in idle {
            let (text, took) = read_all(stream);
            assert!(
                took < Duration::from_secs(2),
                "an idle client is dropped after the header timeout: {text:?} after {took:?}"
            );
        }
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(stream, "GET / HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let (text, _) = read_all(stream);
        assert!(
            text.starts_with("HTTP/1.0 200") && text.ends_with("ok"),
            "{text:?}"
        );
        server.abort();
    }
}
