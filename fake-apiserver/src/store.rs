//! The object store: current objects, the global resourceVersion counter, the event history
//! (the "watch cache") and the registry of open watches.
//!
//! Everything lives behind one mutex (see [`crate::FakeApiServer`]), so a mutation, its
//! history entry and its delivery to every open watch happen atomically, and a new watch's
//! replay of the history and its registration cannot miss or duplicate an event.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::Error;
use crate::resource::ResourceKind;
use crate::selector::{FieldSelector, LabelSelector};
use crate::util;

/// The key of an object within its kind: `(namespace, name)`.
pub(crate) type Key = (String, String);

/// Watch lines are coalesced into body frames of about this size.
pub(crate) const FRAME_SIZE: usize = 64 * 1024;

/// An object as stored: its JSON value (with every server-managed field set) and its
/// pre-serialized form, shared by LIST responses and watch events.
#[derive(Debug)]
pub(crate) struct StoredObject {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) value: Value,
    pub(crate) json: Bytes,
}

impl StoredObject {
    /// Wraps a normalized value (metadata.name/namespace present, labels string-valued).
    fn new(value: Value) -> Self {
        let meta = &value["metadata"];
        let namespace = meta["namespace"].as_str().unwrap_or_default().to_string();
        let name = meta["name"].as_str().unwrap_or_default().to_string();
        let labels = meta["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let json = Bytes::from(serde_json::to_vec(&value).expect("a JSON value always serializes"));
        StoredObject {
            namespace,
            name,
            labels,
            value,
            json,
        }
    }

    /// A copy of this object with `metadata.resourceVersion` set to `rv`.
    fn with_resource_version(&self, rv: u64) -> StoredObject {
        let mut value = self.value.clone();
        value["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        StoredObject::new(value)
    }

    /// `metadata.resourceVersion` as a number (0 if absent).
    pub(crate) fn resource_version(&self) -> u64 {
        self.value["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

/// Which objects a LIST or WATCH selects.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    /// `Some` for namespaced paths.
    pub(crate) namespace: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
}

impl Filter {
    pub(crate) fn matches(&self, obj: &StoredObject) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| ns == obj.namespace)
            && self.labels.matches(&obj.labels)
            && self.fields.matches(&obj.namespace, &obj.name)
    }

    fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }
}

/// The type of a stored change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, as kept in the history.
#[derive(Debug)]
pub(crate) struct HistoryEvent {
    pub(crate) rv: u64,
    pub(crate) kind: ResourceKind,
    pub(crate) ty: EventType,
    /// The object after the change; for a deletion, the last state with the deletion's
    /// resourceVersion.
    pub(crate) object: Arc<StoredObject>,
    /// The object before the change (`None` for a creation).
    pub(crate) prev: Option<Arc<StoredObject>>,
    /// Rendered lines, by [`LineKind`].
    lines: [OnceLock<Bytes>; 4],
}

#[derive(Clone, Copy)]
enum LineKind {
    Added = 0,
    Modified = 1,
    Deleted = 2,
    /// `DELETED` carrying the previous state with this event's resourceVersion: sent to a
    /// watch whose selector matched the object before an update but not after it.
    DeletedPrev = 3,
}

impl HistoryEvent {
    fn new(
        rv: u64,
        kind: ResourceKind,
        ty: EventType,
        object: Arc<StoredObject>,
        prev: Option<Arc<StoredObject>>,
    ) -> Self {
        HistoryEvent {
            rv,
            kind,
            ty,
            object,
            prev,
            lines: Default::default(),
        }
    }

    /// The watch line this event produces for a watch with `filter`, if any — the rules of
    /// the apiserver's cacher (`cacheWatcher.convertToWatchEvent`): an update that makes an
    /// object start matching is `ADDED`, one that makes it stop matching is `DELETED`.
    pub(crate) fn line_for(&self, filter: &Filter) -> Option<Bytes> {
        let cur = self.ty != EventType::Deleted && filter.matches(&self.object);
        let old = self.prev.as_ref().is_some_and(|p| filter.matches(p));
        let kind = match (cur, old) {
            (true, false) => LineKind::Added,
            (true, true) => LineKind::Modified,
            (false, true) if self.ty == EventType::Deleted => LineKind::Deleted,
            (false, true) => LineKind::DeletedPrev,
            (false, false) => return None,
        };
        let line = self.lines[kind as usize].get_or_init(|| match kind {
            LineKind::Added => event_line("ADDED", &self.object.json),
            LineKind::Modified => event_line("MODIFIED", &self.object.json),
            LineKind::Deleted => event_line("DELETED", &self.object.json),
            LineKind::DeletedPrev => {
                let prev = self.prev.as_ref().expect("old matched, so prev exists");
                event_line("DELETED", &prev.with_resource_version(self.rv).json)
            }
        });
        Some(line.clone())
    }
}

/// `{"type":TYPE,"object":OBJECT}\n`
pub(crate) fn event_line(ty: &str, object: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(object.len() + ty.len() + 24);
    buf.extend_from_slice(b"{\"type\":\"");
    buf.extend_from_slice(ty.as_bytes());
    buf.extend_from_slice(b"\",\"object\":");
    buf.extend_from_slice(object);
    buf.extend_from_slice(b"}\n");
    buf.freeze()
}

/// A `BOOKMARK` line for `kind` at `rv`, optionally marking the end of the initial events
/// of a streaming list (`k8s.io/initial-events-end: "true"`).
pub(crate) fn bookmark_line(kind: ResourceKind, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = serde_json::json!({ "resourceVersion": rv.to_string() });
    if initial_events_end {
        metadata["annotations"] = serde_json::json!({ "k8s.io/initial-events-end": "true" });
    }
    let object = serde_json::json!({
        "kind": kind.kind(),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
    });
    event_line(
        "BOOKMARK",
        &serde_json::to_vec(&object).expect("serializes"),
    )
}

/// An `ERROR` line carrying a `Status`.
pub(crate) fn error_line(status: &Value) -> Bytes {
    event_line("ERROR", &serde_json::to_vec(status).expect("serializes"))
}

/// What a watch body receives.
#[derive(Debug)]
pub(crate) enum WatchMsg {
    /// One or more complete event lines.
    Data(Bytes),
    /// Final event lines; the stream ends cleanly after them.
    Last(Bytes),
}

/// An open watch.
#[derive(Debug)]
struct Watcher {
    kind: ResourceKind,
    filter: Filter,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<WatchMsg>,
}

/// An API error, answered as a `Status` (in the HTTP response or as a watch `ERROR` event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(422, "Invalid", message)
    }

    fn expired(message: impl Into<String>) -> Self {
        ApiError::new(410, "Expired", message)
    }

    fn too_large(requested: u64, current: u64) -> Self {
        ApiError::new(
            504,
            "Timeout",
            format!("Too large resource version: {requested}, current: {current}"),
        )
    }

    /// The `Status` object.
    pub(crate) fn status(&self) -> Value {
        let mut status = util::status_json(self.code, self.reason, &self.message);
        if self.reason == "Timeout" && self.message.starts_with("Too large") {
            status["details"] = serde_json::json!({
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            });
        }
        status
    }
}

/// Parameters of a LIST.
#[derive(Debug, Default)]
pub(crate) struct ListQuery {
    pub(crate) filter: Filter,
    pub(crate) limit: Option<usize>,
    pub(crate) continue_token: Option<String>,
    pub(crate) resource_version: Option<String>,
    pub(crate) version_match: Option<String>,
}

/// One LIST response page.
#[derive(Debug)]
pub(crate) struct ListPage {
    pub(crate) resource_version: u64,
    pub(crate) items: Vec<Arc<StoredObject>>,
    pub(crate) continue_token: Option<String>,
    pub(crate) remaining_item_count: Option<u64>,
}

/// Parameters of a WATCH.
#[derive(Debug, Default)]
pub(crate) struct WatchQuery {
    pub(crate) filter: Filter,
    pub(crate) resource_version: Option<String>,
    pub(crate) version_match: Option<String>,
    pub(crate) send_initial_events: Option<bool>,
    pub(crate) bookmarks: bool,
}

/// A started watch: its id (`None` if it ended at once) and the receiving end of its lines.
#[derive(Debug)]
pub(crate) struct WatchStart {
    pub(crate) id: Option<u64>,
    pub(crate) rx: mpsc::UnboundedReceiver<WatchMsg>,
}

/// Accumulates lines into frames of about [`FRAME_SIZE`] bytes.
struct FrameSink<'a> {
    tx: &'a mpsc::UnboundedSender<WatchMsg>,
    buf: BytesMut,
}

impl FrameSink<'_> {
    fn push(&mut self, line: &[u8]) {
        self.buf.extend_from_slice(line);
        if self.buf.len() >= FRAME_SIZE {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            // The receiver is alive: it is owned by the caller of `Store::watch`.
            let _ = self.tx.send(WatchMsg::Data(self.buf.split().freeze()));
        }
    }
}

/// The state of the fake API server.
#[derive(Debug)]
pub(crate) struct Store {
    objects: [BTreeMap<Key, Arc<StoredObject>>; ResourceKind::ALL.len()],
    rv: u64,
    /// A watch or an exact LIST may start from any resourceVersion `>= floor`: every
    /// change after `floor` is still in `history`.
    floor: u64,
    history: VecDeque<Arc<HistoryEvent>>,
    history_limit: usize,
    watchers: BTreeMap<u64, Watcher>,
    next_watcher: u64,
    seed: u64,
    uids: u64,
}

impl Store {
    /// An empty store at resourceVersion 1 keeping at most `history_limit` events.
    pub(crate) fn new(history_limit: usize) -> Self {
        Store {
            objects: Default::default(),
            rv: 1,
            floor: 1,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            watchers: BTreeMap::new(),
            next_watcher: 0,
            seed: util::random_seed(),
            uids: 0,
        }
    }

    /// The current (latest) resourceVersion.
    pub(crate) fn resource_version(&self) -> u64 {
        self.rv
    }

    /// The number of stored objects of `kind`.
    pub(crate) fn len(&self, kind: ResourceKind) -> usize {
        self.objects[kind.index()].len()
    }

    /// The number of open watches.
    pub(crate) fn watcher_count(&self) -> usize {
        self.watchers.len()
    }

    /// One object.
    pub(crate) fn get(
        &self,
        kind: ResourceKind,
        namespace: &str,
        name: &str,
    ) -> Option<Arc<StoredObject>> {
        self.objects[kind.index()]
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Creates or updates an object given as JSON; returns its resourceVersion (unchanged
    /// for a no-op update, which — as on the real server — produces no event).
    pub(crate) fn apply(&mut self, mut value: Value) -> Result<u64, Error> {
        let kind = normalize(&mut value)?;
        let meta = value["metadata"].as_object_mut().expect("normalized");
        meta.remove("resourceVersion");
        let key = (
            meta.get("namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            meta["name"].as_str().unwrap_or_default().to_string(),
        );
        let existing = self.objects[kind.index()].get(&key).cloned();
        let rv = self.rv + 1;
        let ty = match &existing {
            Some(old) => {
                let old_meta = &old.value["metadata"];
                let old_generation = old_meta["generation"].as_i64().unwrap_or(1);
                for field in ["uid", "creationTimestamp"] {
                    match old_meta.get(field) {
                        Some(v) => meta.insert(field.to_string(), v.clone()),
                        None => meta.remove(field),
                    };
                }
                meta.insert("generation".into(), old_generation.into());
                meta.insert(
                    "resourceVersion".into(),
                    old_meta["resourceVersion"].clone(),
                );
                if value == old.value {
                    return Ok(old.resource_version());
                }
                if !same_content(&value, &old.value) {
                    value["metadata"]["generation"] = (old_generation + 1).into();
                }
                EventType::Modified
            }
            None => {
                self.uids += 1;
                meta.entry("uid")
                    .or_insert_with(|| util::uid(self.seed, self.uids).into());
                meta.entry("creationTimestamp")
                    .or_insert_with(|| util::now_rfc3339().into());
                meta.entry("generation").or_insert_with(|| 1.into());
                EventType::Added
            }
        };
        value["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let object = Arc::new(StoredObject::new(value));
        self.rv = rv;
        self.objects[kind.index()].insert(key, object.clone());
        self.record(HistoryEvent::new(rv, kind, ty, object, existing));
        Ok(rv)
    }

    /// Deletes an object; returns the deletion's resourceVersion, or `None` if absent.
    pub(crate) fn delete(
        &mut self,
        kind: ResourceKind,
        namespace: &str,
        name: &str,
    ) -> Option<u64> {
        let old = self.objects[kind.index()].remove(&(namespace.to_string(), name.to_string()))?;
        let rv = self.rv + 1;
        self.rv = rv;
        let object = Arc::new(old.with_resource_version(rv));
        self.record(HistoryEvent::new(
            rv,
            kind,
            EventType::Deleted,
            object,
            Some(old),
        ));
        Some(rv)
    }

    /// Appends an event to the history and delivers it to the open watches.
    fn record(&mut self, event: HistoryEvent) {
        let event = Arc::new(event);
        let mut dead = Vec::new();
        for (id, w) in &self.watchers {
            if w.kind != event.kind {
                continue;
            }
            if let Some(line) = event.line_for(&w.filter)
                && w.tx.send(WatchMsg::Data(line)).is_err()
            {
                dead.push(*id);
            }
        }
        for id in dead {
            self.watchers.remove(&id);
        }
        self.history.push_back(event);
        while self.history.len() > self.history_limit {
            if let Some(evicted) = self.history.pop_front() {
                self.floor = evicted.rv;
            }
        }
    }

    /// Serves one LIST page (see the crate docs for the resourceVersion semantics).
    pub(crate) fn list(&self, kind: ResourceKind, q: &ListQuery) -> Result<ListPage, ApiError> {
        let (snapshot, start_after) = self.list_start(q)?;
        let current = &self.objects[kind.index()];
        // Objects changed after the snapshot: their state at the snapshot. `overrides` holds
        // those that still exist (`None`: created after the snapshot), `deleted` those that
        // existed at the snapshot but are gone now.
        let mut overrides: BTreeMap<Key, Option<Arc<StoredObject>>> = BTreeMap::new();
        let mut deleted: BTreeMap<Key, Arc<StoredObject>> = BTreeMap::new();
        if snapshot < self.rv {
            let mut seen = BTreeSet::new();
            let first = self.history.partition_point(|e| e.rv <= snapshot);
            for e in self.history.range(first..).filter(|e| e.kind == kind) {
                let key = (e.object.namespace.clone(), e.object.name.clone());
                if !seen.insert(key.clone()) {
                    continue; // only the first change after the snapshot tells its state
                }
                if current.contains_key(&key) {
                    overrides.insert(key, e.prev.clone());
                } else if let Some(prev) = &e.prev {
                    deleted.insert(key, prev.clone());
                }
            }
        }

        let lower = match (&start_after, &q.filter.namespace) {
            (Some(k), _) => Bound::Excluded(k.clone()),
            (None, Some(ns)) => Bound::Included((ns.clone(), String::new())),
            (None, None) => Bound::Unbounded,
        };
        let range = (lower, Bound::Unbounded);
        let mut cur = current.range::<Key, _>(range.clone()).peekable();
        let mut gone = deleted.range::<Key, _>(range).peekable();

        let limit = q.limit.filter(|&l| l > 0);
        let mut items = Vec::new();
        let mut last_key: Option<Key> = None;
        let mut more = false;
        let mut remaining = 0u64;
        loop {
            // Merge the current objects with the deleted-since ones, in key order.
            let (key, obj): (&Key, Option<&Arc<StoredObject>>) = match (cur.peek(), gone.peek()) {
                (None, None) => break,
                (Some(&(k, v)), None) => {
                    cur.next();
                    (k, Some(v))
                }
                (None, Some(&(k, v))) => {
                    gone.next();
                    (k, Some(v))
                }
                (Some(&(ck, cv)), Some(&(gk, gv))) => {
                    if ck < gk {
                        cur.next();
                        (ck, Some(cv))
                    } else {
                        gone.next();
                        (gk, Some(gv))
                    }
                }
            };
            if let Some(ns) = &q.filter.namespace
                && key.0 != *ns
            {
                break;
            }
            let obj = match overrides.get(key) {
                Some(state) => state.as_ref(),
                None => obj,
            };
            let Some(obj) = obj else { continue };
            if !q.filter.matches(obj) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                more = true;
                if q.filter.has_selectors() {
                    break;
                }
                remaining += 1;
                continue;
            }
            last_key = Some(key.clone());
            items.push(obj.clone());
        }
        let continue_token = if more {
            last_key
                .map(|(ns, name)| util::hex_encode(format!("{snapshot}/{ns}/{name}").as_bytes()))
        } else {
            None
        };
        let remaining_item_count = (more && !q.filter.has_selectors()).then_some(remaining);
        Ok(ListPage {
            resource_version: snapshot,
            items,
            continue_token,
            remaining_item_count,
        })
    }

    /// The snapshot resourceVersion a LIST is served at and the key to continue after.
    fn list_start(&self, q: &ListQuery) -> Result<(u64, Option<Key>), ApiError> {
        let rv_param = q.resource_version.as_deref().filter(|s| !s.is_empty());
        if let Some(token) = q.continue_token.as_deref().filter(|s| !s.is_empty()) {
            if rv_param.is_some() {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let (snapshot, key) = decode_continue(token)
                .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
            if snapshot < self.floor {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                ));
            }
            if snapshot > self.rv {
                return Err(ApiError::bad_request("continue key is not valid"));
            }
            return Ok((snapshot, Some(key)));
        }
        let version_match = q.version_match.as_deref().filter(|s| !s.is_empty());
        let Some(rv) = rv_param else {
            if version_match.is_some() {
                return Err(ApiError::invalid(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            return Ok((self.rv, None));
        };
        if rv == "0" {
            return match version_match {
                None | Some("NotOlderThan") => Ok((self.rv, None)),
                Some("Exact") => Err(ApiError::invalid(
                    "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
                )),
                Some(other) => Err(ApiError::invalid(format!(
                    "unsupported resourceVersionMatch {other:?}"
                ))),
            };
        }
        let requested = parse_rv(rv)?;
        let exact = match version_match {
            Some("Exact") => true,
            Some("NotOlderThan") => false,
            // Legacy semantics: a non-zero resourceVersion with a limit is an exact read.
            None => q.limit.is_some_and(|l| l > 0),
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "unsupported resourceVersionMatch {other:?}"
                )));
            }
        };
        if requested > self.rv {
            return Err(ApiError::too_large(requested, self.rv));
        }
        if !exact {
            return Ok((self.rv, None));
        }
        if requested < self.floor {
            return Err(ApiError::expired(format!(
                "too old resource version: {requested} ({})",
                self.floor
            )));
        }
        Ok((requested, None))
    }

    /// Opens a watch: queues its initial events (history replay, synthetic `ADDED`s or an
    /// `ERROR`) and registers it for live events.
    pub(crate) fn watch(
        &mut self,
        kind: ResourceKind,
        q: WatchQuery,
    ) -> Result<WatchStart, ApiError> {
        if let Some(send) = q.send_initial_events {
            if q.version_match.as_deref() != Some("NotOlderThan") {
                return Err(ApiError::invalid(
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if send && !q.bookmarks {
                return Err(ApiError::invalid(
                    "sendInitialEvents requires setting allowWatchBookmarks to true",
                ));
            }
        } else if q.version_match.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        let requested = match q.resource_version.as_deref() {
            None | Some("") | Some("0") => None,
            Some(rv) => Some(parse_rv(rv)?),
        };

        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(requested) = requested {
            let error = if requested > self.rv {
                Some(ApiError::too_large(requested, self.rv))
            } else if requested < self.floor && q.send_initial_events != Some(true) {
                Some(ApiError::expired(format!(
                    "too old resource version: {requested} ({})",
                    self.floor
                )))
            } else {
                None
            };
            if let Some(error) = error {
                let _ = tx.send(WatchMsg::Last(error_line(&error.status())));
                return Ok(WatchStart { id: None, rx });
            }
        }

        let mut sink = FrameSink {
            tx: &tx,
            buf: BytesMut::new(),
        };
        match (q.send_initial_events, requested) {
            // Streaming list: the current state, then the end-of-initial-events bookmark.
            (Some(true), _) => {
                for obj in self.objects[kind.index()].values() {
                    if q.filter.matches(obj) {
                        sink.push(&event_line("ADDED", &obj.json));
                    }
                }
                sink.push(&bookmark_line(kind, self.rv, true));
            }
            // "Start at most recent / any": synthetic ADDED events for the current state.
            (None, None) => {
                for obj in self.objects[kind.index()].values() {
                    if q.filter.matches(obj) {
                        sink.push(&event_line("ADDED", &obj.json));
                    }
                }
            }
            // sendInitialEvents=false without a resourceVersion: only future changes.
            (Some(false), None) => {}
            // Resume: replay every retained change after the requested version.
            (_, Some(requested)) => {
                let first = self.history.partition_point(|e| e.rv <= requested);
                for e in self.history.range(first..).filter(|e| e.kind == kind) {
                    if let Some(line) = e.line_for(&q.filter) {
                        sink.push(&line);
                    }
                }
            }
        }
        sink.flush();

        let id = self.next_watcher;
        self.next_watcher += 1;
        self.watchers.insert(
            id,
            Watcher {
                kind,
                filter: q.filter,
                bookmarks: q.bookmarks,
                tx,
            },
        );
        Ok(WatchStart { id: Some(id), rx })
    }

    /// Forgets a watch (its body was dropped).
    pub(crate) fn remove_watcher(&mut self, id: u64) {
        self.watchers.remove(&id);
    }

    /// Sends a `BOOKMARK` at the current resourceVersion to every watch that allows them.
    pub(crate) fn send_bookmarks(&mut self) {
        let lines = ResourceKind::ALL.map(|k| bookmark_line(k, self.rv, false));
        self.watchers.retain(|_, w| {
            !w.bookmarks
                || w.tx
                    .send(WatchMsg::Data(lines[w.kind.index()].clone()))
                    .is_ok()
        });
    }

    /// Ends every open watch with a `410 Expired` `ERROR` event and compacts the history, so
    /// that resuming from any earlier resourceVersion is also answered with 410.
    pub(crate) fn expire_watches(&mut self) {
        let message = format!("too old resource version: history compacted at {}", self.rv);
        let status = ApiError::expired(message).status();
        let line = error_line(&status);
        for (_, w) in std::mem::take(&mut self.watchers) {
            let _ = w.tx.send(WatchMsg::Last(line.clone()));
        }
        self.history.clear();
        self.floor = self.rv;
    }
}

fn parse_rv(rv: &str) -> Result<u64, ApiError> {
    rv.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))
}

fn decode_continue(token: &str) -> Option<(u64, Key)> {
    let raw = String::from_utf8(util::hex_decode(token)?).ok()?;
    let mut parts = raw.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    let ns = parts.next()?.to_string();
    let name = parts.next()?.to_string();
    Some((rv, (ns, name)))
}

/// Whether two objects have the same content outside `metadata` and `status` (a change
/// there bumps `metadata.generation`).
fn same_content(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| -> Map<String, Value> {
        v.as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "status"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    strip(a) == strip(b)
}

/// Validates an object given to `apply` and fills `kind`, `apiVersion` and, for a
/// namespaced kind, `metadata.namespace` (default `default`).
pub(crate) fn normalize(value: &mut Value) -> Result<ResourceKind, Error> {
    let obj = value
        .as_object_mut()
        .ok_or_else(|| Error::InvalidObject("not a JSON object".into()))?;
    let kind_name = obj
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::InvalidObject("missing \"kind\"".into()))?;
    let kind = ResourceKind::from_kind(kind_name)
        .ok_or_else(|| Error::UnsupportedKind(kind_name.to_string()))?;
    match obj.get("apiVersion").and_then(Value::as_str) {
        None => {
            obj.insert("apiVersion".into(), kind.api_version().into());
        }
        Some(v) if v == kind.api_version() => {}
        Some(v) => {
            return Err(Error::InvalidObject(format!(
                "apiVersion {v:?} does not serve kind {kind_name}; expected {:?}",
                kind.api_version()
            )));
        }
    }
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| Error::InvalidObject("\"metadata\" is not an object".into()))?;
    let name = meta.get("name").and_then(Value::as_str).unwrap_or_default();
    if name.is_empty() || name.contains('/') {
        return Err(Error::InvalidObject(format!(
            "metadata.name must be a non-empty name without '/', got {name:?}"
        )));
    }
    if kind.namespaced() {
        normalize_namespace(meta)?;
    } else {
        // Cluster-scoped: no namespace, as the real server stores it.
        match meta.remove("namespace") {
            None | Some(Value::Null) => {}
            Some(Value::String(ns)) if ns.is_empty() => {}
            Some(other) => {
                return Err(Error::InvalidObject(format!(
                    "{kind} is cluster-scoped, but metadata.namespace is {other}"
                )));
            }
        }
    }
    match meta.get("labels") {
        None | Some(Value::Null) => {
            meta.remove("labels");
        }
        Some(Value::Object(labels)) if labels.values().all(Value::is_string) => {}
        Some(other) => {
            return Err(Error::InvalidObject(format!(
                "metadata.labels must map strings to strings, got {other}"
            )));
        }
    }
    Ok(kind)
}

/// Fills `metadata.namespace` of a namespaced object (default `default`).
fn normalize_namespace(meta: &mut Map<String, Value>) -> Result<(), Error> {
    match meta.get("namespace") {
        None | Some(Value::Null) => {
            meta.insert("namespace".into(), "default".into());
        }
        Some(Value::String(ns)) if !ns.is_empty() && !ns.contains('/') => {}
        Some(Value::String(ns)) if ns.is_empty() => {
            meta.insert("namespace".into(), "default".into());
        }
        Some(other) => {
            return Err(Error::InvalidObject(format!(
                "invalid metadata.namespace {other}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(name: &str, labels: Value) -> Value {
        json!({"kind": "Service", "metadata": {"name": name, "labels": labels}, "spec": {"ports": [{"port": 80}]}})
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<WatchMsg>) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            let (WatchMsg::Data(b) | WatchMsg::Last(b)) = msg;
            for line in std::str::from_utf8(&b).unwrap().lines() {
                out.push(serde_json::from_str(line).unwrap());
            }
        }
        out
    }

    fn types(events: &[Value]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e["type"].as_str().unwrap(),
                    e["object"]["metadata"]["name"].as_str().unwrap_or("-")
                )
            })
            .collect()
    }

    #[test]
    fn apply_sets_server_fields_and_detects_noops() {
        let mut s = Store::new(100);
        let rv = s.apply(svc("a", json!({"x": "1"}))).unwrap();
        assert_eq!(rv, 2);
        let a = s.get(ResourceKind::Service, "default", "a").unwrap();
        assert_eq!(a.value["apiVersion"], "v1");
        assert_eq!(a.value["metadata"]["resourceVersion"], "2");
        assert_eq!(a.value["metadata"]["generation"], 1);
        let uid = a.value["metadata"]["uid"].clone();
        assert!(uid.is_string());
        // No-op.
        assert_eq!(s.apply(svc("a", json!({"x": "1"}))).unwrap(), 2);
        // Label change: new rv, same generation and uid.
        assert_eq!(s.apply(svc("a", json!({"x": "2"}))).unwrap(), 3);
        let a = s.get(ResourceKind::Service, "default", "a").unwrap();
        assert_eq!(a.value["metadata"]["generation"], 1);
        assert_eq!(a.value["metadata"]["uid"], uid);
        // Spec change bumps generation.
        let mut changed = svc("a", json!({"x": "2"}));
        changed["spec"]["ports"][0]["port"] = json!(81);
        assert_eq!(s.apply(changed).unwrap(), 4);
        assert_eq!(
            s.get(ResourceKind::Service, "default", "a").unwrap().value["metadata"]["generation"],
            2
        );
        assert_eq!(s.delete(ResourceKind::Service, "default", "a"), Some(5));
        assert_eq!(s.delete(ResourceKind::Service, "default", "a"), None);
    }

    #[test]
    fn apply_rejects_bad_objects() {
        let mut s = Store::new(100);
        assert!(matches!(
            s.apply(json!({"kind": "Pod", "metadata": {"name": "p"}})),
            Err(Error::UnsupportedKind(_))
        ));
        assert!(s.apply(json!({"metadata": {"name": "p"}})).is_err());
        assert!(s.apply(json!({"kind": "Service", "metadata": {}})).is_err());
        assert!(
            s.apply(json!({"kind": "Service", "apiVersion": "v2", "metadata": {"name": "a"}}))
                .is_err()
        );
        assert!(
            s.apply(json!({"kind": "Service", "metadata": {"name": "a", "labels": {"a": 1}}}))
                .is_err()
        );
    }

    #[test]
    fn selector_transitions_in_watch() {
        let mut s = Store::new(100);
        let filter = Filter {
            labels: LabelSelector::parse("!skip").unwrap(),
            ..Filter::default()
        };
        let mut w = s
            .watch(
                ResourceKind::Service,
                WatchQuery {
                    filter,
                    resource_version: Some("1".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        s.apply(svc("a", json!({}))).unwrap();
        s.apply(svc("a", json!({"skip": "y"}))).unwrap();
        s.apply(svc("a", json!({"skip": "y", "z": "1"}))).unwrap();
        s.apply(svc("a", json!({}))).unwrap();
        s.apply(svc("a", json!({"q": "1"}))).unwrap();
        s.delete(ResourceKind::Service, "default", "a").unwrap();
        let events = drain(&mut w.rx);
        assert_eq!(
            types(&events),
            ["ADDED a", "DELETED a", "ADDED a", "MODIFIED a", "DELETED a"]
        );
        // The DELETED sent when the object stops matching carries the old content with the
        // event's resourceVersion.
        assert_eq!(events[1]["object"]["metadata"]["resourceVersion"], "3");
        assert!(
            events[1]["object"]["metadata"]["labels"]
                .get("skip")
                .is_none()
        );
        assert_eq!(events[4]["object"]["metadata"]["resourceVersion"], "7");
    }

    #[test]
    fn watch_replays_history_and_expires() {
        let mut s = Store::new(3);
        for i in 0..5 {
            s.apply(svc(&format!("s{i}"), json!({}))).unwrap();
        }
        // rv 2..=6; history keeps 4,5,6; floor = 3.
        let mut w = s
            .watch(
                ResourceKind::Service,
                WatchQuery {
                    resource_version: Some("3".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            types(&drain(&mut w.rx)),
            ["ADDED s2", "ADDED s3", "ADDED s4"]
        );
        let mut old = s
            .watch(
                ResourceKind::Service,
                WatchQuery {
                    resource_version: Some("2".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        let events = drain(&mut old.rx);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["type"], "ERROR");
        assert_eq!(events[0]["object"]["code"], 410);
        assert!(old.id.is_none());
        // Too large.
        let mut future = s
            .watch(
                ResourceKind::Service,
                WatchQuery {
                    resource_version: Some("99".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(drain(&mut future.rx)[0]["object"]["code"], 504);
        // Synthetic ADDED for rv 0.
        let mut any = s
            .watch(
                ResourceKind::Service,
                WatchQuery {
                    resource_version: Some("0".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(drain(&mut any.rx).len(), 5);
        // Expire.
        s.expire_watches();
        let events = drain(&mut w.rx);
        assert_eq!(events[0]["object"]["code"], 410);
        assert_eq!(s.watcher_count(), 0);
        let mut again = s
            .watch(
                ResourceKind::Service,
                WatchQuery {
                    resource_version: Some("5".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(drain(&mut again.rx)[0]["object"]["reason"], "Expired");
        let mut current = s
            .watch(
                ResourceKind::Service,
                WatchQuery {
                    resource_version: Some("6".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(drain(&mut current.rx).is_empty());
        assert!(current.id.is_some());
    }

    #[test]
    fn streaming_list_initial_events() {
        let mut s = Store::new(100);
        s.apply(svc("a", json!({}))).unwrap();
        s.apply(svc("b", json!({}))).unwrap();
        let q = WatchQuery {
            resource_version: Some("0".into()),
            version_match: Some("NotOlderThan".into()),
            send_initial_events: Some(true),
            bookmarks: true,
            ..Default::default()
        };
        let mut w = s.watch(ResourceKind::Service, q).unwrap();
        let events = drain(&mut w.rx);
        assert_eq!(types(&events), ["ADDED a", "ADDED b", "BOOKMARK -"]);
        assert_eq!(
            events[2]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
            "true"
        );
        assert_eq!(events[2]["object"]["metadata"]["resourceVersion"], "3");
        // Validation.
        let bad = WatchQuery {
            send_initial_events: Some(true),
            bookmarks: true,
            ..Default::default()
        };
        assert_eq!(s.watch(ResourceKind::Service, bad).unwrap_err().code, 422);
    }

    #[test]
    fn paginated_list_is_a_consistent_snapshot() {
        let mut s = Store::new(1000);
        for i in 0..10 {
            s.apply(svc(&format!("s{i}"), json!({}))).unwrap();
        }
        let snapshot = s.resource_version();
        let mut q = ListQuery {
            limit: Some(4),
            ..Default::default()
        };
        let page1 = s.list(ResourceKind::Service, &q).unwrap();
        assert_eq!(page1.items.len(), 4);
        assert_eq!(page1.remaining_item_count, Some(6));
        // Changes between pages: delete s5 (not yet listed), create s45, update s6.
        s.delete(ResourceKind::Service, "default", "s5").unwrap();
        s.apply(svc("s45", json!({}))).unwrap();
        s.apply(svc("s6", json!({"new": "1"}))).unwrap();
        q.continue_token = page1.continue_token.clone();
        let page2 = s.list(ResourceKind::Service, &q).unwrap();
        q.continue_token = page2.continue_token.clone();
        let page3 = s.list(ResourceKind::Service, &q).unwrap();
        assert!(page3.continue_token.is_none());
        let names: Vec<_> = page1
            .items
            .iter()
            .chain(&page2.items)
            .chain(&page3.items)
            .map(|o| o.name.clone())
            .collect();
        assert_eq!(
            names,
            ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9"]
        );
        assert!(page2.items.iter().all(|o| o.labels.is_empty()));
        assert_eq!(page2.resource_version, snapshot);
        assert_eq!(page3.resource_version, snapshot);
        // Exact read at an older version.
        let exact = ListQuery {
            resource_version: Some(snapshot.to_string()),
            version_match: Some("Exact".into()),
            ..Default::default()
        };
        assert_eq!(
            s.list(ResourceKind::Service, &exact).unwrap().items.len(),
            10
        );
        // After compaction the continue token is expired.
        s.expire_watches();
        assert_eq!(s.list(ResourceKind::Service, &q).unwrap_err().code, 410);
        assert_eq!(s.list(ResourceKind::Service, &exact).unwrap_err().code, 410);
    }

    #[test]
    fn namespaced_list_and_selectors() {
        let mut s = Store::new(100);
        for ns in ["a", "b", "c"] {
            for name in ["x", "y"] {
                let mut v = svc(name, json!({"ns": ns}));
                v["metadata"]["namespace"] = json!(ns);
                s.apply(v).unwrap();
            }
        }
        let q = ListQuery {
            filter: Filter {
                namespace: Some("b".into()),
                ..Filter::default()
            },
            ..Default::default()
        };
        let page = s.list(ResourceKind::Service, &q).unwrap();
        assert_eq!(
            page.items
                .iter()
                .map(|o| format!("{}/{}", o.namespace, o.name))
                .collect::<Vec<_>>(),
            ["b/x", "b/y"]
        );
        let q = ListQuery {
            filter: Filter {
                labels: LabelSelector::parse("ns!=b").unwrap(),
                ..Filter::default()
            },
            limit: Some(3),
            ..Default::default()
        };
        let page = s.list(ResourceKind::Service, &q).unwrap();
        assert_eq!(page.items.len(), 3);
        assert!(page.continue_token.is_some());
        assert_eq!(page.remaining_item_count, None);
        assert_eq!(
            s.list(ResourceKind::EndpointSlice, &ListQuery::default())
                .unwrap()
                .items
                .len(),
            0
        );
    }

    #[test]
    fn nodes_are_cluster_scoped_and_selected_by_name() {
        let mut s = Store::new(100);
        for name in ["node-a", "node-b"] {
            s.apply(json!({"kind": "Node", "metadata": {"name": name}}))
                .unwrap();
        }
        let a = s.get(ResourceKind::Node, "", "node-a").unwrap();
        assert_eq!(a.value["apiVersion"], "v1");
        assert!(
            a.value["metadata"].get("namespace").is_none(),
            "{}",
            a.value
        );
        let q = ListQuery {
            filter: Filter {
                fields: FieldSelector::parse("metadata.name=node-b").unwrap(),
                ..Filter::default()
            },
            ..Default::default()
        };
        let page = s.list(ResourceKind::Node, &q).unwrap();
        let names: Vec<_> = page.items.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["node-b"]);
        let mut namespaced = json!({"kind": "Node", "metadata": {"name": "n", "namespace": "x"}});
        assert!(normalize(&mut namespaced).is_err());
    }
}
