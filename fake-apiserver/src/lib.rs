//! A protocol-faithful fake of the Kubernetes API server for three resources, `v1` Services,
//! `discovery.k8s.io/v1` EndpointSlices and `v1` Nodes (cluster-scoped), for testing
//! list/watch clients such as
//! `kube::runtime::watcher` over plain HTTP.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use fake_apiserver::{FakeApiServer, ResourceKind};
//! let server = FakeApiServer::start().await?;
//! server.write_kubeconfig("/tmp/kubeconfig")?; // server: http://127.0.0.1:PORT
//! let rv = server.apply(serde_json::json!({
//!     "apiVersion": "v1", "kind": "Service",
//!     "metadata": {"name": "web", "namespace": "default"},
//!     "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
//! }))?;
//! server.expire_watches(); // every open watch gets 410 Expired: clients relist
//! println!("{rv} {} LISTs", server.list_count(ResourceKind::Service));
//! # Ok(()) }
//! ```
//!
//! # Protocol
//!
//! Paths: `/api/v1/services`, `/api/v1/namespaces/{ns}/services[/{name}]`,
//! `/api/v1/nodes[/{name}]`,
//! `/apis/discovery.k8s.io/v1/endpointslices`,
//! `/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices[/{name}]` (GET only), plus
//! `/version`, `/api`, `/apis`, `/api/v1`, `/apis/discovery.k8s.io/v1` and `/healthz`.
//!
//! * One global resourceVersion counter (starting at 1) is bumped by every create, update
//!   and delete of any resource. A no-op update (same content) changes nothing and sends
//!   no event, as on the real server. Creation sets `uid`, `creationTimestamp` and
//!   `generation: 1`; an update that changes anything outside `metadata`/`status` bumps
//!   `generation`.
//! * **LIST** answers `{kind: ServiceList|EndpointSliceList, apiVersion, metadata:
//!   {resourceVersion, continue?, remainingItemCount?}, items}`. `limit`/`continue`
//!   paginate over a consistent snapshot: every page is served at the first page's
//!   resourceVersion (reconstructed from the event history), and a continue token whose
//!   snapshot was compacted away is answered `410 Expired`. `resourceVersion` unset →
//!   most recent; `0` → any (most recent); `N` with `resourceVersionMatch=NotOlderThan` (or
//!   no match and no limit) → most recent if `N <= current`; `N` with `Exact` (or no match
//!   with a limit, the legacy rule) → the snapshot at `N`, `410` if compacted. `N` newer than
//!   the current version → `504 Timeout` "Too large resource version".
//! * **WATCH** (`watch=true`) streams newline-delimited JSON events with chunked transfer
//!   encoding: every retained change after `resourceVersion` (replayed from the history),
//!   then live changes. `resourceVersion` unset or `0` → synthetic `ADDED` events for the
//!   current objects first. A version older than the retained history → one `ERROR` event
//!   with a `410 Expired` Status, then the stream ends; a version newer than the current one
//!   → an `ERROR` event with `504 Timeout` ("Too large resource version"). With
//!   `allowWatchBookmarks=true`, `BOOKMARK` events at the current resourceVersion are sent
//!   every [`FakeApiServerBuilder::bookmark_interval`]. The stream ends cleanly after
//!   `timeoutSeconds` (default 1800 s).
//! * **Streaming lists** (`sendInitialEvents=true&resourceVersionMatch=NotOlderThan`, which
//!   kube-runtime only sends with `watcher::Config::streaming_lists()`): `ADDED` events for
//!   the current objects, then a `BOOKMARK` annotated `k8s.io/initial-events-end: "true"`,
//!   then live changes. The validation rules of the real server apply (422 otherwise).
//! * `labelSelector` (equality, inequality, existence, `in`/`notin`, `<`/`>`) and
//!   `fieldSelector` (`metadata.name`, `metadata.namespace`; others are rejected with 400)
//!   filter lists and watches. As in the apiserver's watch cache, an update that makes an
//!   object stop matching a watch's selector is sent to it as `DELETED` (with the previous
//!   content and the new resourceVersion), one that makes it start matching as `ADDED`.
//! * **Faults**, set at run time with [`FakeApiServer::set_fault`] (and cleared with
//!   `None`): truncated bodies, invalid JSON, objects of the wrong kind, `500`s, `429`s with
//!   `Retry-After`, and answers held back for a while ([`Fault`]); besides the connection
//!   resets and `503`s of [`FakeApiServer::set_unavailable_with`].

mod fault;
mod resource;
mod routes;
pub mod selector;
mod server;
mod store;
mod util;
mod watch;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use fault::Fault;
pub use resource::{ResourceKind, UnknownKind};

use server::Shared;
use store::Store;

/// Locks a mutex, ignoring poisoning (the protected state stays consistent: every
/// mutation completes before any code that could panic).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Errors of [`FakeApiServer::apply`] and [`FakeApiServer::bulk_apply`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object could not be serialized to JSON.
    #[error("cannot serialize the object: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The object's kind is not Service, EndpointSlice or Node.
    #[error("unsupported kind {0:?} (the fake serves Service, EndpointSlice and Node)")]
    UnsupportedKind(String),
    /// The object is malformed (no kind, no name, wrong apiVersion, non-string labels…).
    #[error("invalid object: {0}")]
    InvalidObject(String),
}

/// How the server behaves while [`FakeApiServer::set_unavailable_with`] is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailability {
    /// Every connection is reset (accepted, then closed with a TCP RST before anything is
    /// read) and every open connection is dropped. The client sees a transport error,
    /// which kube-client does **not** retry internally, so the `watcher`'s own backoff
    /// (`default_backoff()`: 0.8 s, 1.6 s, 3.2 s … with jitter) paces the retries — the
    /// behaviour of a crashed or restarting API server. This is what
    /// [`FakeApiServer::set_unavailable`] uses.
    Reset,
    /// Every request is answered `503 Service Unavailable` with `Retry-After: 1` (open
    /// connections are dropped too). Note that kube-client's default retry layer retries
    /// 503 responses itself (up to 15 times, honouring `Retry-After`) before the `watcher`
    /// sees an error, so recovery is usually invisible to the watcher.
    ServiceUnavailable,
}

/// The method and verb of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// GET of a collection without `watch=true`.
    List,
    /// GET of a collection with `watch=true`.
    Watch,
    /// GET of one object.
    Get,
    /// Anything else (discovery, version, unknown paths, other methods).
    Other,
}

/// One request received by the server, for assertions on what a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The HTTP method.
    pub method: String,
    /// The URL path.
    pub path: String,
    /// The decoded query parameters, in order.
    pub query: Vec<(String, String)>,
    /// The resource addressed, if any.
    pub kind: Option<ResourceKind>,
    /// The namespace of a namespaced path.
    pub namespace: Option<String>,
    /// The verb.
    pub verb: Verb,
}

impl RequestRecord {
    /// The first value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Configures a [`FakeApiServer`] before starting it.
#[derive(Debug, Clone)]
pub struct FakeApiServerBuilder {
    addr: SocketAddr,
    bookmark_interval: Duration,
    history_limit: usize,
}

impl Default for FakeApiServerBuilder {
    fn default() -> Self {
        FakeApiServerBuilder {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            bookmark_interval: Duration::from_secs(1),
            history_limit: 50_000,
        }
    }
}

impl FakeApiServerBuilder {
    /// The address to listen on (default `127.0.0.1:0`, an ephemeral port).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// The port to listen on, on 127.0.0.1 (0: an ephemeral port).
    pub fn port(mut self, port: u16) -> Self {
        self.addr.set_port(port);
        self
    }

    /// How often `BOOKMARK` events are sent to watches that allow them (default 1 s;
    /// `Duration::ZERO` disables periodic bookmarks — [`FakeApiServer::send_bookmarks`]
    /// still sends one on demand).
    pub fn bookmark_interval(mut self, interval: Duration) -> Self {
        self.bookmark_interval = interval;
        self
    }

    /// How many events the history keeps (default 50 000). A watch or exact list from a
    /// resourceVersion older than the oldest retained event gets `410 Expired`.
    pub fn history_limit(mut self, events: usize) -> Self {
        self.history_limit = events;
        self
    }

    /// Binds the listener and starts serving.
    pub async fn start(self) -> io::Result<FakeApiServer> {
        let listener = TcpListener::bind(self.addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(Store::new(self.history_limit), addr));
        let mut tasks = vec![tokio::spawn(server::accept_loop(listener, shared.clone()))];
        if !self.bookmark_interval.is_zero() {
            tasks.push(tokio::spawn(server::bookmark_loop(
                Arc::downgrade(&shared.store),
                self.bookmark_interval,
            )));
        }
        Ok(FakeApiServer {
            shared,
            addr,
            tasks,
        })
    }
}

/// A running fake API server and its test controls. Dropping it stops the server and
/// closes every connection.
#[derive(Debug)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts a server with the default settings on `127.0.0.1:0`.
    pub async fn start() -> io::Result<Self> {
        Self::builder().start().await
    }

    /// A builder for non-default settings.
    pub fn builder() -> FakeApiServerBuilder {
        FakeApiServerBuilder::default()
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (YAML) whose only cluster's server is [`url`](Self::url), with no
    /// authentication, current-context set and namespace `default`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n\
             users:\n\
             - name: fake\n  user: {{}}\n\
             preferences: {{}}\n",
            self.url()
        )
    }

    /// Writes [`kubeconfig`](Self::kubeconfig) to `path`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// Creates or updates a Service, EndpointSlice or Node — a k8s-openapi object, a
    /// `serde_json::Value` or anything serializing to one with `kind` set — and returns its
    /// resourceVersion. `metadata.namespace` defaults to `default` (a Node has none);
    /// `resourceVersion`,
    /// `uid` and `creationTimestamp` given by the caller are overridden on update (no
    /// optimistic concurrency check). A no-op update returns the unchanged version.
    pub fn apply(&self, obj: impl Serialize) -> Result<String, Error> {
        let mut value = serde_json::to_value(obj)?;
        store::normalize(&mut value)?;
        let rv = lock(&self.shared.store).apply(value)?;
        Ok(rv.to_string())
    }

    /// Applies many objects under one lock (each is still its own change with its own
    /// resourceVersion and event). Every object is validated before any is applied, so on
    /// error nothing changed. Returns the resulting current resourceVersion.
    pub fn bulk_apply<I>(&self, objs: I) -> Result<String, Error>
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        let values = objs
            .into_iter()
            .map(|obj| {
                let mut value = serde_json::to_value(obj)?;
                store::normalize(&mut value)?;
                Ok(value)
            })
            .collect::<Result<Vec<Value>, Error>>()?;
        let mut store = lock(&self.shared.store);
        for value in values {
            store.apply(value)?;
        }
        Ok(store.resource_version().to_string())
    }

    /// Deletes an object; returns the deletion's resourceVersion, `None` if it did not
    /// exist.
    pub fn delete(&self, kind: ResourceKind, namespace: &str, name: &str) -> Option<String> {
        lock(&self.shared.store)
            .delete(kind, namespace, name)
            .map(|rv| rv.to_string())
    }

    /// The stored object, as served.
    pub fn get(&self, kind: ResourceKind, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.shared.store)
            .get(kind, namespace, name)
            .map(|o| o.value.clone())
    }

    /// The number of stored objects of `kind`.
    pub fn object_count(&self, kind: ResourceKind) -> usize {
        lock(&self.shared.store).len(kind)
    }

    /// The current (latest) resourceVersion.
    pub fn current_resource_version(&self) -> String {
        lock(&self.shared.store).resource_version().to_string()
    }

    /// Ends every open watch with an `ERROR` event carrying a `410 Expired` Status, and
    /// compacts the history, so that a watch resumed from any earlier resourceVersion (or
    /// a LIST continued from an earlier page) also gets 410: clients must relist.
    pub fn expire_watches(&self) {
        lock(&self.shared.store).expire_watches();
    }

    /// Closes every open connection abruptly — open watches end mid-stream without a
    /// final chunk or event, as on a network failure. Clients resume their watches from
    /// the last resourceVersion they saw.
    pub fn drop_connections(&self) {
        lock(&self.shared.connections).abort_all();
    }

    /// Makes the server unavailable (`true`: [`Unavailability::Reset`]) or available
    /// again (`false`).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.set_unavailable_with(unavailable.then_some(Unavailability::Reset));
    }

    /// Makes the server unavailable in the given way (`None`: available). Becoming
    /// unavailable drops every open connection.
    pub fn set_unavailable_with(&self, mode: Option<Unavailability>) {
        let mut conns = lock(&self.shared.connections);
        conns.mode = mode;
        if mode.is_some() {
            conns.abort_all();
        }
    }

    /// Makes the server misbehave in the given way for every request for a resource
    /// (`None`: behave again). Setting a fault drops every open connection, so open
    /// watches end mid-stream and the client comes back to meet it.
    pub fn set_fault(&self, fault: Option<Fault>) {
        *lock(&self.shared.fault) = fault;
        if fault.is_some() {
            lock(&self.shared.connections).abort_all();
        }
    }

    /// Sends a `BOOKMARK` at the current resourceVersion to every watch that allows them,
    /// now (besides the periodic ones).
    pub fn send_bookmarks(&self) {
        lock(&self.shared.store).send_bookmarks();
    }

    /// How many LIST requests `kind` received.
    pub fn list_count(&self, kind: ResourceKind) -> u64 {
        self.shared.counters(kind).lists.load(Ordering::SeqCst)
    }

    /// How many WATCH requests `kind` received.
    pub fn watch_count(&self, kind: ResourceKind) -> u64 {
        self.shared.counters(kind).watches.load(Ordering::SeqCst)
    }

    /// How many GET requests (of a single object) `kind` received.
    pub fn get_count(&self, kind: ResourceKind) -> u64 {
        self.shared.counters(kind).gets.load(Ordering::SeqCst)
    }

    /// The requests received so far (the last 10 000), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).iter().cloned().collect()
    }

    /// The requests for `kind` with `verb`, oldest first.
    pub fn requests_for(&self, kind: ResourceKind, verb: Verb) -> Vec<RequestRecord> {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.kind == Some(kind) && r.verb == verb)
            .cloned()
            .collect()
    }

    /// The number of open watch streams.
    pub fn open_watches(&self) -> usize {
        lock(&self.shared.store).watcher_count()
    }

    /// The number of open client connections.
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.connections).len()
    }

    /// Waits until at least `n` watches are open, for at most `timeout`; returns whether
    /// they are.
    pub async fn wait_for_watches(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.open_watches() >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        lock(&self.shared.connections).abort_all();
    }
}
