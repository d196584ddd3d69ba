//! A frontend's backends, held compactly. They share the frontend's family and protocol, so
//! each keeps only its address, port and two flags: 8 bytes for IPv4 (a [`Backend`] takes
//! 24), 20 for IPv6. At 100,000 Services × 10 endpoints that is 160 bytes a Service less,
//! more with a NodePort (issue 12's memory target).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Backend, L4Addr, Protocol};

/// The backends of one frontend, in order. Built from a list of [`Backend`]s and read back
/// as [`Backend`]s; a list mixing families or protocols (which translation never makes) is
/// kept as it came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendList(Repr);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Repr {
    V4(Protocol, Box<[Compact<[u8; 4]>]>),
    V6(Protocol, Box<[Compact<[u8; 16]>]>),
    Mixed(Box<[Backend]>),
}

/// One backend without what its list shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Compact<A> {
    address: A,
    port: u16,
    /// [`Backend::condition_bits`].
    flags: u8,
}

impl<A> Compact<A> {
    const fn new(address: A, backend: &Backend) -> Self {
        Self {
            address,
            port: backend.addr.port,
            flags: backend.condition_bits(),
        }
    }

    fn backend(&self, address: IpAddr, protocol: Protocol) -> Backend {
        Backend::with_condition_bits(L4Addr::new(address, self.port, protocol), self.flags)
    }
}

impl Default for BackendList {
    fn default() -> Self {
        Self(Repr::V4(Protocol::Tcp, Box::default()))
    }
}

impl From<Vec<Backend>> for BackendList {
    fn from(backends: Vec<Backend>) -> Self {
        let Some(first) = backends.first() else {
            return Self::default();
        };
        let protocol = first.addr.protocol;
        let v4 = compact(&backends, protocol, |address| match address {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        });
        if let Some(v4) = v4 {
            return Self(Repr::V4(protocol, v4));
        }
        let v6 = compact(&backends, protocol, |address| match address {
            IpAddr::V6(a) => Some(a.octets()),
            IpAddr::V4(_) => None,
        });
        match v6 {
            Some(v6) => Self(Repr::V6(protocol, v6)),
            None => Self(Repr::Mixed(backends.into_boxed_slice())),
        }
    }
}

/// `backends` in the compact form whose address `address` gives, if every one of them fits
/// it: an address of its family, the list's protocol, the external scope.
fn compact<A>(
    backends: &[Backend],
    protocol: Protocol,
    address: impl Fn(IpAddr) -> Option<A>,
) -> Option<Box<[Compact<A>]>> {
    backends
        .iter()
        .map(|b| {
            let plain = b.addr.protocol == protocol && !b.addr.is_internal();
            plain
                .then(|| address(b.addr.address))
                .flatten()
                .map(|a| Compact::new(a, b))
        })
        .collect()
}

impl BackendList {
    #[must_use]
    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::V4(_, list) => list.len(),
            Repr::V6(_, list) => list.len(),
            Repr::Mixed(list) => list.len(),
        }
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The backend at `index`.
    #[must_use]
    pub fn get(&self, index: usize) -> Option<Backend> {
        match &self.0 {
            Repr::V4(protocol, list) => list
                .get(index)
                .map(|c| c.backend(Ipv4Addr::from(c.address).into(), *protocol)),
            Repr::V6(protocol, list) => list
                .get(index)
                .map(|c| c.backend(Ipv6Addr::from(c.address).into(), *protocol)),
            Repr::Mixed(list) => list.get(index).copied(),
        }
    }

    /// The backends, in order.
    #[must_use]
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            list: self,
            next: 0,
        }
    }
}

/// The backends of a [`BackendList`], in order.
#[derive(Clone, Debug)]
pub struct Iter<'a> {
    list: &'a BackendList,
    next: usize,
}

impl Iterator for Iter<'_> {
    type Item = Backend;

    fn next(&mut self) -> Option<Backend> {
        let backend = self.list.get(self.next)?;
        self.next += 1;
        Some(backend)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.list.len().saturating_sub(self.next);
        (left, Some(left))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a BackendList {
    type Item = Backend;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EndpointState;

    fn backend(address: &str, port: u16, protocol: Protocol) -> Backend {
        Backend::new(
            L4Addr::new(address.parse::<IpAddr>().unwrap(), port, protocol),
            EndpointState::Ready,
        )
    }

    #[test]
    fn backends_read_back_as_they_were_given_whatever_their_form() {
        let mut terminating = backend("10.0.0.2", 8080, Protocol::Tcp);
        terminating.state = EndpointState::Terminating;
        terminating.remote = true;
        let lists = [
            vec![backend("10.0.0.1", 8080, Protocol::Tcp), terminating],
            vec![
                backend("fd00::1", 53, Protocol::Udp),
                backend("fd00::2", 5353, Protocol::Udp),
            ],
            // Mixed families and protocols: kept as they came.
            vec![
                backend("10.0.0.1", 80, Protocol::Tcp),
                backend("fd00::1", 80, Protocol::Tcp),
            ],
            vec![
                backend("10.0.0.1", 80, Protocol::Tcp),
                backend("10.0.0.1", 80, Protocol::Udp),
            ],
            vec![Backend::new(
                L4Addr::new([10, 0, 0, 1], 80, Protocol::Tcp).internal(),
                EndpointState::Ready,
            )],
            Vec::new(),
        ];
        for list in lists {
            let compact = BackendList::from(list.clone());
            assert_eq!(compact.len(), list.len());
            assert_eq!(compact.iter().collect::<Vec<_>>(), list);
            assert_eq!(compact.iter().len(), list.len());
            assert_eq!(compact.get(list.len()), None);
        }
    }

    #[test]
    fn an_ipv4_backend_takes_eight_bytes() {
        assert_eq!(size_of::<Compact<[u8; 4]>>(), 8);
        assert_eq!(size_of::<Compact<[u8; 16]>>(), 20);
        assert_eq!(size_of::<Backend>(), 24, "what a backend took before");
    }
}
