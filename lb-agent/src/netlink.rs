//! "The node's links or addresses changed": notifications from the kernel's routing netlink
//! (`NETLINK_ROUTE`, groups `RTMGRP_LINK`, `RTMGRP_IPV4_IFADDR`, `RTMGRP_IPV6_IFADDR`), in the
//! network namespace of the process that opens them.
//!
//! The messages are not parsed: any of them, and an overrun (`ENOBUFS`, messages lost), only
//! means "read the addresses again" (see [`crate::devices::resolve`]). Bursts (an interface
//! coming up announces its link and each address) are coalesced into one notification.
use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
    },
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::Instant,
};

/// A burst is over once no message came for this long...
pub const QUIET: Duration = Duration::from_millis(100);
/// ...or this long after its first message, so a steady stream still notifies.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// The multicast groups: link changes and IPv4 and IPv6 address changes.
const GROUPS: u32 =
    (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR).cast_unsigned();

/// A subscription to the node's link and address changes.
#[derive(Debug)]
pub struct Changes {
    fd: AsyncFd<OwnedFd>,
    /// Messages are read into this and dropped.
    buf: Vec<u8>,
    /// The burst being coalesced, if one started (kept here, so dropping a [`Changes::next`]
    /// future, as `tokio::select!` does, loses nothing).
    burst: Option<Burst>,
}

impl Changes {
    /// Subscribes in the calling thread's network namespace. Needs a tokio runtime.
    ///
    /// # Errors
    /// When the socket cannot be created, bound or registered with the runtime.
    pub fn open() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        // Port id 0: the kernel assigns one.
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, GROUPS))?;
        // SAFETY: the socket is owned by the `AsyncFd` and never replaced, so it stays open
        // and the same for the `AsyncFd`'s whole life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Self {
            fd,
            buf: vec![0; 32 * 1024],
            burst: None,
        })
    }

    /// Resolves once a burst of changes is over (see [`QUIET`], [`MAX_DELAY`]). Cancel-safe:
    /// a burst seen by a dropped call is reported by the next one.
    ///
    /// # Errors
    /// When reading the socket fails other than by an overrun (which counts as a change).
    pub async fn next(&mut self) -> io::Result<()> {
        loop {
            let Some(burst) = self.burst else {
                if self.read().await? {
                    self.burst = Some(Burst::new(Instant::now()));
                }
                continue;
            };
            tokio::select! {
                read = self.read() => {
                    if read? {
                        self.burst = Some(burst.extended(Instant::now()));
                    }
                }
                () = tokio::time::sleep_until(burst.deadline()) => {
                    self.burst = None;
                    return Ok(());
                }
            }
        }
    }

    /// Waits until the socket is readable, then reads every queued message: whether there
    /// was any (or an overrun).
    async fn read(&mut self) -> io::Result<bool> {
        let mut guard = self.fd.readable().await?;
        // Nothing below awaits: once readiness is taken, the messages are read to the end.
        let mut changed = false;
        loop {
            match recv(
                guard.get_inner().as_raw_fd(),
                &mut self.buf,
                MsgFlags::MSG_DONTWAIT,
            ) {
                // An overrun: some messages are lost, whatever they said the addresses are
                // to be read again.
                Ok(_) | Err(Errno::ENOBUFS) => changed = true,
                Err(Errno::EAGAIN) => {
                    guard.clear_ready();
                    return Ok(changed);
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A burst of messages: when its notification is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Burst {
    first: Instant,
    last: Instant,
}

impl Burst {
    /// A burst whose first message came at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            first: now,
            last: now,
        }
    }

    /// The burst with one more message, at `now`.
    #[must_use]
    pub fn extended(self, now: Instant) -> Self {
        Self {
            first: self.first,
            last: now.max(self.last),
        }
    }

    /// [`QUIET`] after the last message, but no later than [`MAX_DELAY`] after the first.
    pub fn deadline(&self) -> Instant {
        (self.last + QUIET).min(self.first + MAX_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_message_is_reported_after_the_quiet_time() {
        let t0 = Instant::now();
        assert_eq!(Burst::new(t0).deadline(), t0 + QUIET);
    }

    #[test]
    fn each_message_pushes_the_deadline_back() {
        let t0 = Instant::now();
        let burst = Burst::new(t0).extended(t0 + Duration::from_millis(60));
        assert_eq!(burst.deadline(), t0 + Duration::from_millis(60) + QUIET);
    }

    #[test]
    fn a_steady_stream_is_reported_within_the_max_delay() {
        let t0 = Instant::now();
        let mut burst = Burst::new(t0);
        // A message every 50 ms, each before the quiet time is over, for 3 s.
        for i in 1..60 {
            let now = t0 + Duration::from_millis(50 * i);
            if now >= burst.deadline() {
                break;
            }
            burst = burst.extended(now);
        }
        assert_eq!(burst.deadline(), t0 + MAX_DELAY);
    }

    #[test]
    fn a_late_message_does_not_move_the_deadline_earlier() {
        let t0 = Instant::now();
        let burst = Burst::new(t0 + Duration::from_millis(50)).extended(t0);
        assert_eq!(burst.deadline(), t0 + Duration::from_millis(50) + QUIET);
    }

    /// Subscribing needs no privilege (the kernel's messages are tested end to end, in
    /// `tests/tests/nodeport.rs`).
    #[tokio::test]
    async fn opens_unprivileged() {
        Changes::open().unwrap();
    }
}
