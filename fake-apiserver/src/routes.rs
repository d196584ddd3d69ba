//! Request routing and the handlers: LIST, WATCH and GET of Services, EndpointSlices and Nodes,
//! plus the discovery and version endpoints a client may probe.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tracing::debug;

use crate::resource::ResourceKind;
use crate::selector::{FieldSelector, LabelSelector};
use crate::server::{ApiBody, Shared};
use crate::store::{ApiError, Filter, ListPage, ListQuery, WatchQuery};
use crate::watch::WatchBody;
use crate::{RequestRecord, Unavailability, Verb, lock};

/// The watch duration when `timeoutSeconds` is absent or 0 (the real server picks a random
/// value between 30 and 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// A parsed request path.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Collection {
        kind: ResourceKind,
        namespace: Option<String>,
    },
    Object {
        kind: ResourceKind,
        namespace: String,
        name: String,
    },
    Version,
    Health,
    CoreVersions,
    Groups,
    Resources(&'static str),
    NotFound,
}

fn parse_route(path: &str) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group_version, rest): (&'static str, &[&str]) = match segs.as_slice() {
        ["version"] => return Route::Version,
        ["healthz" | "readyz" | "livez"] => return Route::Health,
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::Groups,
        ["api", "v1", rest @ ..] => ("v1", rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("discovery.k8s.io/v1", rest),
        _ => return Route::NotFound,
    };
    let kind_of = |plural: &str| {
        ResourceKind::ALL
            .into_iter()
            .find(|k| k.api_version() == group_version && k.plural() == plural)
    };
    // A cluster-scoped kind (Node) has no `namespaces/{ns}` paths; its objects are at
    // `{plural}/{name}`, stored under the empty namespace.
    let namespaced = |plural: &str| kind_of(plural).filter(|k| k.namespaced());
    let cluster_scoped = |plural: &str| kind_of(plural).filter(|k| !k.namespaced());
    let (kind, namespace, name) = match rest {
        [] => return Route::Resources(group_version),
        [plural] => (kind_of(plural), None, None),
        ["namespaces", ns, plural] => (namespaced(plural), Some(*ns), None),
        ["namespaces", ns, plural, name] => (namespaced(plural), Some(*ns), Some(*name)),
        [plural, name] => (cluster_scoped(plural), Some(""), Some(*name)),
        _ => return Route::NotFound,
    };
    match (kind, namespace, name) {
        (Some(kind), namespace, None) => Route::Collection {
            kind,
            namespace: namespace.map(str::to_string),
        },
        (Some(kind), Some(namespace), Some(name)) => Route::Object {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        },
        _ => Route::NotFound,
    }
}

/// Query parameters, in order.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Self {
        Query(
            form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean parameter with Go's `strconv.ParseBool` syntax.
    fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid boolean value {other:?} for {name}"
            ))),
        }
    }

    fn number(&self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("invalid value {v:?} for {name}"))),
        }
    }

    fn filter(&self, namespace: Option<String>) -> Result<Filter, ApiError> {
        let labels = LabelSelector::parse(self.get("labelSelector").unwrap_or_default())
            .map_err(|e| ApiError::bad_request(e.0))?;
        let fields = FieldSelector::parse(self.get("fieldSelector").unwrap_or_default())
            .map_err(|e| ApiError::bad_request(e.0))?;
        Ok(Filter {
            namespace,
            labels,
            fields,
        })
    }
}

/// Handles one request.
pub(crate) async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<ApiBody> {
    let route = parse_route(req.uri().path());
    let query = Query::parse(req.uri().query());
    let watch = query.bool("watch");
    let (kind, namespace, verb) = match &route {
        Route::Collection { kind, namespace } => {
            let verb = if watch == Ok(Some(true)) {
                Verb::Watch
            } else {
                Verb::List
            };
            (Some(*kind), namespace.clone(), verb)
        }
        Route::Object {
            kind, namespace, ..
        } => (Some(*kind), Some(namespace.clone()), Verb::Get),
        _ => (None, None, Verb::Other),
    };
    let verb = if req.method() == Method::GET {
        verb
    } else {
        Verb::Other
    };
    debug!(method = %req.method(), uri = %req.uri(), "request");
    shared.record(RequestRecord {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: query.0.clone(),
        kind,
        namespace,
        verb,
    });

    if lock(&shared.connections).mode == Some(Unavailability::ServiceUnavailable) {
        let mut resp = status_response(&ApiError::new(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        ));
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return resp;
    }
    let fault = *lock(&shared.fault);
    if let (Some(fault), Some(kind)) = (fault, kind) {
        if let Some(delay) = fault.delay() {
            tokio::time::sleep(delay).await;
        }
        let resource_version = lock(&shared.store).resource_version();
        if let Some(answer) = fault.answer(kind, verb, resource_version) {
            return answer;
        }
    }
    if req.method() != Method::GET {
        return status_response(&ApiError::new(
            405,
            "MethodNotAllowed",
            format!(
                "the server does not allow this method on the requested resource ({})",
                req.method()
            ),
        ));
    }

    let result = match route {
        Route::Collection { kind, namespace } => match watch {
            Err(e) => Err(e),
            Ok(Some(true)) => serve_watch(shared, kind, namespace, &query),
            Ok(_) => serve_list(shared, kind, namespace, &query),
        },
        Route::Object {
            kind,
            namespace,
            name,
        } => serve_get(shared, kind, &namespace, &name),
        Route::Version => Ok(json_response(&version_info())),
        Route::Health => Ok(Response::new(ApiBody::full("ok"))),
        Route::CoreVersions => Ok(json_response(&json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}
            ],
        }))),
        Route::Groups => Ok(json_response(&api_groups())),
        Route::Resources(group_version) => Ok(json_response(&api_resources(group_version))),
        Route::NotFound => Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )),
    };
    result.unwrap_or_else(|e| status_response(&e))
}

fn serve_list(
    shared: &Shared,
    kind: ResourceKind,
    namespace: Option<String>,
    query: &Query,
) -> Result<Response<ApiBody>, ApiError> {
    let q = ListQuery {
        filter: query.filter(namespace)?,
        limit: query.number("limit")?.map(|l| l as usize),
        continue_token: query.get("continue").map(str::to_string),
        resource_version: query.get("resourceVersion").map(str::to_string),
        version_match: query.get("resourceVersionMatch").map(str::to_string),
    };
    let page = lock(&shared.store).list(kind, &q)?;
    // The (potentially large) body is assembled outside the store lock.
    Ok(raw_json_response(StatusCode::OK, list_body(kind, &page)))
}

/// `{"kind":"ServiceList","apiVersion":"v1","metadata":{...},"items":[...]}` from the
/// pre-serialized items.
fn list_body(kind: ResourceKind, page: &ListPage) -> Bytes {
    let mut metadata = json!({ "resourceVersion": page.resource_version.to_string() });
    if let Some(token) = &page.continue_token {
        metadata["continue"] = token.clone().into();
    }
    if let Some(n) = page.remaining_item_count {
        metadata["remainingItemCount"] = n.into();
    }
    let size: usize = page.items.iter().map(|o| o.json.len() + 1).sum();
    let mut buf = Vec::with_capacity(size + 256);
    buf.extend_from_slice(b"{\"kind\":\"");
    buf.extend_from_slice(kind.list_kind().as_bytes());
    buf.extend_from_slice(b"\",\"apiVersion\":\"");
    buf.extend_from_slice(kind.api_version().as_bytes());
    buf.extend_from_slice(b"\",\"metadata\":");
    buf.extend_from_slice(&serde_json::to_vec(&metadata).expect("serializes"));
    buf.extend_from_slice(b",\"items\":[");
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(&item.json);
    }
    buf.extend_from_slice(b"]}");
    Bytes::from(buf)
}

fn serve_watch(
    shared: &Shared,
    kind: ResourceKind,
    namespace: Option<String>,
    query: &Query,
) -> Result<Response<ApiBody>, ApiError> {
    let q = WatchQuery {
        filter: query.filter(namespace)?,
        resource_version: query.get("resourceVersion").map(str::to_string),
        version_match: query.get("resourceVersionMatch").map(str::to_string),
        send_initial_events: query.bool("sendInitialEvents")?,
        bookmarks: query.bool("allowWatchBookmarks")? == Some(true),
    };
    let timeout = match query.number("timeoutSeconds")? {
        None | Some(0) => DEFAULT_WATCH_TIMEOUT,
        Some(secs) => Duration::from_secs(secs),
    };
    let start = lock(&shared.store).watch(kind, q)?;
    let body = WatchBody::new(start, Arc::downgrade(&shared.store), timeout);
    let mut resp = Response::new(ApiBody::Watch(Box::new(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

fn serve_get(
    shared: &Shared,
    kind: ResourceKind,
    namespace: &str,
    name: &str,
) -> Result<Response<ApiBody>, ApiError> {
    let obj = lock(&shared.store).get(kind, namespace, name);
    match obj {
        Some(obj) => Ok(raw_json_response(StatusCode::OK, obj.json.clone())),
        None => {
            let resource = match kind.group() {
                "" => kind.plural().to_string(),
                group => format!("{}.{group}", kind.plural()),
            };
            let mut status =
                ApiError::new(404, "NotFound", format!("{resource} \"{name}\" not found")).status();
            status["details"] = json!({"name": name, "group": kind.group(), "kind": kind.plural()});
            Ok(raw_json_response(
                StatusCode::NOT_FOUND,
                serde_json::to_vec(&status).expect("serializes"),
            ))
        }
    }
}

fn raw_json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ApiBody> {
    let mut resp = Response::new(ApiBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn json_response(value: &Value) -> Response<ApiBody> {
    raw_json_response(
        StatusCode::OK,
        serde_json::to_vec(value).expect("serializes"),
    )
}

fn status_response(error: &ApiError) -> Response<ApiBody> {
    let status = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    raw_json_response(
        status,
        serde_json::to_vec(&error.status()).expect("serializes"),
    )
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn api_groups() -> Value {
    let gv = json!({"groupVersion": "discovery.k8s.io/v1", "version": "v1"});
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [{"name": "discovery.k8s.io", "versions": [gv.clone()], "preferredVersion": gv}],
    })
}

fn api_resources(group_version: &str) -> Value {
    let resources: Vec<Value> = ResourceKind::ALL
        .into_iter()
        .filter(|k| k.api_version() == group_version)
        .map(|k| {
            let mut r = json!({
                "name": k.plural(),
                "singularName": k.kind().to_ascii_lowercase(),
                "namespaced": k.namespaced(),
                "kind": k.kind(),
                "verbs": ["get", "list", "watch"],
            });
            if k == ResourceKind::Service {
                r["shortNames"] = json!(["svc"]);
            }
            r
        })
        .collect();
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        use ResourceKind::*;
        assert_eq!(
            parse_route("/api/v1/services"),
            Route::Collection {
                kind: Service,
                namespace: None
            }
        );
        assert_eq!(
            parse_route("/api/v1/namespaces/ns/services"),
            Route::Collection {
                kind: Service,
                namespace: Some("ns".into())
            }
        );
        assert_eq!(
            parse_route("/api/v1/namespaces/ns/services/web"),
            Route::Object {
                kind: Service,
                namespace: "ns".into(),
                name: "web".into()
            }
        );
        assert_eq!(
            parse_route("/apis/discovery.k8s.io/v1/endpointslices"),
            Route::Collection {
                kind: EndpointSlice,
                namespace: None
            }
        );
        assert_eq!(
            parse_route("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices/b"),
            Route::Object {
                kind: EndpointSlice,
                namespace: "a".into(),
                name: "b".into()
            }
        );
        assert_eq!(parse_route("/api/v1/endpointslices"), Route::NotFound);
        assert_eq!(
            parse_route("/api/v1/nodes"),
            Route::Collection {
                kind: Node,
                namespace: None
            }
        );
        assert_eq!(
            parse_route("/api/v1/nodes/node-a"),
            Route::Object {
                kind: Node,
                namespace: String::new(),
                name: "node-a".into()
            }
        );
        assert_eq!(parse_route("/api/v1/namespaces/a/nodes"), Route::NotFound);
        assert_eq!(parse_route("/api/v1/services/web"), Route::NotFound);
        assert_eq!(
            parse_route("/apis/discovery.k8s.io/v1/services"),
            Route::NotFound
        );
        assert_eq!(parse_route("/api/v1/pods"), Route::NotFound);
        assert_eq!(parse_route("/api/v1/services/x"), Route::NotFound);
        assert_eq!(parse_route("/api/v1"), Route::Resources("v1"));
        assert_eq!(parse_route("/version"), Route::Version);
    }
}
