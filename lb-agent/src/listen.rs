//! TCP listeners on both address families: an unspecified address (`0.0.0.0` or `::`)
//! means every address of the node, IPv4 and IPv6, as Go's listeners in kube-proxy take it.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
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
