//! The UDP side of the DNS server: one socket read by one thread per core, each reading a
//! query, answering it in place and sending the answer, with no task or channel per message,
//! and off the agent's runtime, whose work (a sync, a conntrack sweep) never
//! delays an answer.
//!
//! hickory's server spawns a task per UDP message and sends its answer through a channel
//! to the socket's task, which cost a quarter of the answering rate (dnsmasq answered
//! 1 / 0.78 as many queries). Here [`Handler::answer_udp`] answers each query on the
//! reading thread: from the answer cache, or decoded, resolved and encoded by hickory; only
//! a query that waits for an upstream (a forwarded name, an ExternalName target) becomes a
//! task of the agent's runtime.
//!
//! One socket for all threads rather than one `SO_REUSEPORT` socket each: the kernel hashes
//! a client's address to one of those sockets, so a few busy clients (a node's resolvers,
//! dnsperf's four) could all land on one thread while the other idles; threads reading one
//! socket each take the next query.
use std::{
    future::Future,
    io,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use std::{io::IoSliceMut, os::fd::AsRawFd as _};

use hickory_server::{
    net::{NetError, runtime::TokioTime},
    proto::rr::Record,
    server::{RequestHandler as _, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponse,
};
use nix::{
    errno::Errno,
    sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg},
};
use socket2::{SockAddr, SockRef};
use tracing::{debug, warn};

use super::server::{Handler, Udp, encode_udp};

/// The largest query lb reads (EDNS allows more, but a question fits far below this).
const MAX_QUERY: usize = 4096;

/// The most queries read at once.
const BATCH: usize = 32;

/// How often an idle thread looks whether it should stop.
const STOP_POLL: Duration = Duration::from_millis(500);

/// The most threads reading the socket.
const MAX_THREADS: usize = 8;

/// The threads answering on a socket; dropping this stops them (within [`STOP_POLL`]).
pub struct UdpThreads {
    stop: Arc<AtomicBool>,
}

impl Drop for UdpThreads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts one thread per core answering the queries on `socket` with `handler`. Called
/// from the agent's runtime, which runs the answers that wait for an upstream.
///
/// # Errors
/// When the socket cannot be set up or a thread cannot be started.
pub(super) fn start(socket: UdpSocket, handler: Arc<Handler>) -> io::Result<UdpThreads> {
    socket.set_read_timeout(Some(STOP_POLL))?;
    let socket = Arc::new(socket);
    // Made first: a thread that cannot start drops it, which stops those that did.
    let threads = UdpThreads {
        stop: Arc::new(AtomicBool::new(false)),
    };
    let runtime = tokio::runtime::Handle::current();
    let count = std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS));
    for i in 0..count {
        let (socket, handler, stop, runtime) = (
            Arc::clone(&socket),
            Arc::clone(&handler),
            Arc::clone(&threads.stop),
            runtime.clone(),
        );
        std::thread::Builder::new()
            .name(format!("lb-dns-udp-{i}"))
            .spawn(move || {
                // Upstream sockets and timers of the answers that wait belong to the runtime.
                let _runtime = runtime.enter();
                serve(&socket, &handler, &stop);
            })?;
    }
    Ok(threads)
}

/// Answers the queries arriving on `socket` until `stop`: a batch at a time, all that are
/// waiting (up to [`BATCH`]) in one `recvmmsg`, which saves a call into the kernel per
/// query and a wake-up per query on a busy socket.
fn serve(socket: &Arc<UdpSocket>, handler: &Arc<Handler>, stop: &AtomicBool) {
    let mut bufs = vec![[0u8; MAX_QUERY]; BATCH];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut received: Vec<(usize, Option<SocketAddr>)> = Vec::with_capacity(BATCH);
    let mut out = Vec::with_capacity(512);
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = receive(socket, &mut bufs, &mut headers, &mut received) {
            match e {
                // The read timeout (to look at `stop`), or a signal.
                Errno::EAGAIN | Errno::EINTR => {}
                e => {
                    warn!(error = %e, "reading DNS queries failed");
                    // Not a busy loop if the error repeats.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            continue;
        }
        for (buf, &(len, src)) in bufs.iter().zip(&received) {
            let Some(src) = src.filter(|&src| can_answer(src)) else {
                continue;
            };
            answer(socket, handler, &buf[..len], src, &mut out);
        }
    }
}

/// Reads the queries waiting on `socket` (at least one: blocks until one arrives or the
/// read timeout) into `bufs`, their lengths and sources into `received`.
fn receive(
    socket: &UdpSocket,
    bufs: &mut [[u8; MAX_QUERY]],
    headers: &mut MultiHeaders<SockaddrStorage>,
    received: &mut Vec<(usize, Option<SocketAddr>)>,
) -> nix::Result<()> {
    received.clear();
    let mut slices: Vec<[IoSliceMut<'_>; 1]> =
        bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
    let messages = recvmmsg(
        socket.as_raw_fd(),
        headers,
        slices.iter_mut(),
        MsgFlags::MSG_WAITFORONE,
        None,
    )?;
    received.extend(messages.map(|m| (m.bytes, m.address.and_then(socket_addr))));
    Ok(())
}

/// A source address as std has it.
fn socket_addr(addr: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

/// Answers one query: at once when no upstream is needed, else as a task of the runtime.
fn answer(
    socket: &Arc<UdpSocket>,
    handler: &Arc<Handler>,
    query: &[u8],
    src: SocketAddr,
    out: &mut Vec<u8>,
) {
    match handler.answer_udp(query, src, out) {
        Udp::Answer => send(socket, out, src),
        Udp::Nothing => {}
        Udp::Later(request) => {
            let reply = UdpReply {
                socket: Arc::clone(socket),
                dst: src,
            };
            let handler = Arc::clone(handler);
            let answer = Box::pin(async move {
                handler
                    .handle_request::<_, TokioTime>(&request, reply)
                    .await;
            });
            answer_now_or_later(answer);
        }
    }
}

/// Sends an answer without waiting: a full socket buffer drops it, as it would drop the
/// query, and the client asks again.
fn send(socket: &UdpSocket, answer: &[u8], dst: SocketAddr) {
    if let Err(e) =
        SockRef::from(socket).send_to_with_flags(answer, &SockAddr::from(dst), libc::MSG_DONTWAIT)
    {
        debug!(error = %e, %dst, "sending a DNS answer failed");
    }
}

/// Polls `answer` once; if it waits (for an upstream), it goes on as a task of the runtime.
fn answer_now_or_later(mut answer: std::pin::Pin<Box<impl Future<Output = ()> + Send + 'static>>) {
    let mut cx = Context::from_waker(Waker::noop());
    if answer.as_mut().poll(&mut cx) == Poll::Pending {
        tokio::spawn(answer);
    }
}

/// Whether an answer can go to `src` (hickory's rule: no port 0, no unspecified or
/// broadcast address).
fn can_answer(src: SocketAddr) -> bool {
    match src {
        SocketAddr::V4(v4) => {
            v4.port() != 0 && !v4.ip().is_unspecified() && !v4.ip().is_broadcast()
        }
        SocketAddr::V6(v6) => v6.port() != 0 && !v6.ip().is_unspecified(),
    }
}

/// Sends an answer that waited for an upstream, from the task that produced it.
#[derive(Clone)]
struct UdpReply {
    socket: Arc<UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::with_capacity(512);
        let info = encode_udp(response, &mut bytes)?;
        send(&self.socket, &bytes, self.dst);
        Ok(info)
    }
}
