//! The HTTP/1.1 server: its own accept loop (so that connections can be dropped and refused
//! on demand), the shared state, request counters and the response body type.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use crate::resource::ResourceKind;
use crate::store::Store;
use crate::watch::WatchBody;
use crate::{RequestRecord, Unavailability, Verb, lock, routes};

/// How many request records are kept (the oldest are dropped first).
const MAX_REQUEST_RECORDS: usize = 10_000;

/// Per-resource request counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) lists: AtomicU64,
    pub(crate) watches: AtomicU64,
    pub(crate) gets: AtomicU64,
}

/// The open connections and the availability mode, under one lock so that refusing new
/// connections and dropping the open ones cannot race with the accept loop.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    pub(crate) mode: Option<Unavailability>,
    tasks: HashMap<u64, AbortHandle>,
    next_id: u64,
}

impl Connections {
    /// Aborts every connection task: the sockets are closed mid-stream, without a final
    /// chunk or event.
    pub(crate) fn abort_all(&mut self) {
        for (_, task) in self.tasks.drain() {
            task.abort();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.tasks.len()
    }
}

/// State shared by the handle, the accept loop and the request handlers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: Arc<Mutex<Store>>,
    pub(crate) counters: [Counters; ResourceKind::ALL.len()],
    pub(crate) connections: Mutex<Connections>,
    /// The misbehaviour in force, if any.
    pub(crate) fault: Mutex<Option<crate::Fault>>,
    pub(crate) requests: Mutex<VecDeque<RequestRecord>>,
    pub(crate) addr: SocketAddr,
}

impl Shared {
    pub(crate) fn new(store: Store, addr: SocketAddr) -> Self {
        Shared {
            store: Arc::new(Mutex::new(store)),
            counters: Default::default(),
            connections: Mutex::new(Connections::default()),
            fault: Mutex::new(None),
            requests: Mutex::new(VecDeque::new()),
            addr,
        }
    }

    pub(crate) fn counters(&self, kind: ResourceKind) -> &Counters {
        &self.counters[kind.index()]
    }

    /// Counts and records a request.
    pub(crate) fn record(&self, record: RequestRecord) {
        if let Some(kind) = record.kind {
            let c = self.counters(kind);
            match record.verb {
                Verb::List => c.lists.fetch_add(1, Ordering::SeqCst),
                Verb::Watch => c.watches.fetch_add(1, Ordering::SeqCst),
                Verb::Get => c.gets.fetch_add(1, Ordering::SeqCst),
                Verb::Other => 0,
            };
        }
        let mut requests = lock(&self.requests);
        if requests.len() >= MAX_REQUEST_RECORDS {
            requests.pop_front();
        }
        requests.push_back(record);
    }
}

/// Accepts connections forever, serving each with HTTP/1.1 on its own task.
pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let mut conns = lock(&shared.connections);
        if conns.mode == Some(Unavailability::Reset) {
            // SO_LINGER 0: closing sends a TCP RST, like a crashed or restarting server.
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let id = conns.next_id;
        conns.next_id += 1;
        let conn_shared = shared.clone();
        let task = tokio::spawn(async move {
            let handler_shared = conn_shared.clone();
            let service = service_fn(move |req| {
                let shared = handler_shared.clone();
                async move { Ok::<_, Infallible>(routes::handle(&shared, req).await) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, "connection ended with an error");
            }
            lock(&conn_shared.connections).tasks.remove(&id);
        });
        conns.tasks.insert(id, task.abort_handle());
    }
}

/// Sends a `BOOKMARK` to every watch that allows them, every `interval`, while the store
/// exists.
pub(crate) async fn bookmark_loop(store: std::sync::Weak<Mutex<Store>>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(store) = store.upgrade() else { return };
        lock(&store).send_bookmarks();
    }
}

/// A response body: a complete buffer or a watch stream.
pub(crate) enum ApiBody {
    Full(Option<Bytes>),
    Watch(Box<WatchBody>),
}

impl ApiBody {
    pub(crate) fn full(data: impl Into<Bytes>) -> Self {
        ApiBody::Full(Some(data.into()))
    }
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ApiBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ApiBody::Watch(w) => Pin::new(w.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ApiBody::Full(data) => data.is_none(),
            ApiBody::Watch(w) => w.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ApiBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ApiBody::Watch(w) => w.size_hint(),
        }
    }
}
