//! Misbehaviours the server can be told to show at run time ([`Fault`], set with
//! [`crate::FakeApiServer::set_fault`]), for tests of how a client copes with a broken API
//! server: what each answers to a request for a resource.

use std::time::Duration;

use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};

use crate::Verb;
use crate::resource::ResourceKind;
use crate::server::ApiBody;
use crate::store::ApiError;

/// A misbehaviour of every request for a resource (Service, EndpointSlice, Node) while it is
/// set. Setting one drops every open connection, so open watches end mid-stream too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// LIST and WATCH answers are 200 and end half-way through an object.
    TruncatedStream,
    /// LIST and WATCH answers are 200 with a body that is not JSON.
    InvalidJson,
    /// LIST and WATCH answers carry an object of another kind (a ConfigMap where a
    /// Service, EndpointSlice or Node belongs).
    WrongKind,
    /// Every request is answered `500 Internal Server Error` (a Status).
    InternalError,
    /// Every request is answered `429 Too Many Requests` with `Retry-After` seconds, as the
    /// API server's priority and fairness does under load.
    TooManyRequests { retry_after_secs: u32 },
    /// Every answer is held back this long before its headers, then given as usual.
    Slow(Duration),
}

impl Fault {
    /// How long to hold the answer back.
    pub(crate) fn delay(self) -> Option<Duration> {
        match self {
            Fault::Slow(delay) => Some(delay),
            _ => None,
        }
    }

    /// The answer to a request of `verb` for `kind` instead of the real one, if the fault
    /// replaces it; `resource_version` is the store's current one.
    pub(crate) fn answer(
        self,
        kind: ResourceKind,
        verb: Verb,
        resource_version: u64,
    ) -> Option<Response<ApiBody>> {
        let collection = matches!(verb, Verb::List | Verb::Watch);
        let body = match self {
            Fault::Slow(_) => return None,
            Fault::InternalError => {
                return Some(status(&ApiError::new(
                    500,
                    "InternalError",
                    "an error on the server (\"fake fault\") has prevented the request from succeeding",
                )));
            }
            Fault::TooManyRequests { retry_after_secs } => {
                let mut resp = status(&ApiError::new(
                    429,
                    "TooManyRequests",
                    "too many requests, please try again later",
                ));
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
                return Some(resp);
            }
            _ if !collection => return None,
            Fault::InvalidJson => "this is not JSON {\"kind\": ".to_owned(),
            Fault::TruncatedStream => {
                let whole = object_json(kind, resource_version);
                let half = &whole[..whole.len() / 2];
                match verb {
                    Verb::Watch => format!("{{\"type\":\"ADDED\",\"object\":{half}"),
                    _ => format!("{}{half}", list_head(kind, resource_version)),
                }
            }
            Fault::WrongKind => {
                let config_map = format!(
                    "{{\"kind\":\"ConfigMap\",\"apiVersion\":\"v1\",\"metadata\":{{\"name\":\"wrong-kind\",\
                     \"namespace\":\"default\",\"resourceVersion\":\"{resource_version}\"}},\"data\":{{}}}}"
                );
                match verb {
                    Verb::Watch => format!("{{\"type\":\"ADDED\",\"object\":{config_map}}}\n"),
                    _ => format!("{}{config_map}]}}", list_head(kind, resource_version)),
                }
            }
        };
        let mut resp = Response::new(ApiBody::full(body));
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Some(resp)
    }
}

/// The start of a list of `kind`, up to its first item.
fn list_head(kind: ResourceKind, resource_version: u64) -> String {
    format!(
        "{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{resource_version}\"}},\"items\":[",
        kind.list_kind(),
        kind.api_version()
    )
}

/// A whole, valid-looking object of `kind`.
fn object_json(kind: ResourceKind, resource_version: u64) -> String {
    format!(
        "{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{{\"name\":\"truncated\",\
         \"namespace\":\"default\",\"resourceVersion\":\"{resource_version}\"}}}}",
        kind.kind(),
        kind.api_version()
    )
}

fn status(error: &ApiError) -> Response<ApiBody> {
    let code = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = Response::new(ApiBody::full(
        serde_json::to_vec(&error.status()).expect("serializes"),
    ));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_list_is_not_json_and_a_wrong_kind_list_is() {
        let truncated = Fault::TruncatedStream
            .answer(ResourceKind::Service, Verb::List, 7)
            .unwrap();
        let ApiBody::Full(Some(body)) = truncated.into_body() else {
            panic!("a full body")
        };
        assert!(serde_json::from_slice::<serde_json::Value>(&body).is_err());
        let wrong = Fault::WrongKind
            .answer(ResourceKind::Service, Verb::List, 7)
            .unwrap();
        let ApiBody::Full(Some(body)) = wrong.into_body() else {
            panic!("a full body")
        };
        let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(list["kind"], "ServiceList");
        assert_eq!(list["items"][0]["kind"], "ConfigMap");
    }

    #[test]
    fn too_many_requests_says_when_to_come_back() {
        let resp = Fault::TooManyRequests {
            retry_after_secs: 2,
        }
        .answer(ResourceKind::EndpointSlice, Verb::Watch, 1)
        .unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[RETRY_AFTER], "2");
        assert!(
            Fault::Slow(Duration::from_secs(1))
                .answer(ResourceKind::Service, Verb::List, 1)
                .is_none()
        );
    }
}
