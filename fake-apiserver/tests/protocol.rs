//! Wire-level behaviour, checked with kube-client's `Api` and with raw HTTP.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

use common::*;
use fake_apiserver::{FakeApiServer, ResourceKind, Unavailability};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, VersionMatch, WatchEvent, WatchParams};
use kube::{Api, ResourceExt};

/// Sends a raw HTTP/1.1 GET and returns the response head and the first `n` body lines
/// (decoding chunked encoding by hand).
fn raw_get(server: &FakeApiServer, path: &str, n: usize) -> (String, Vec<String>) {
    let mut stream = std::net::TcpStream::connect(server.addr()).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: fake\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let mut body = Vec::new();
    let mut lines = Vec::new();
    while lines.len() < n {
        if chunked {
            let mut size = String::new();
            reader.read_line(&mut size).unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..size]);
        } else {
            reader.read_to_end(&mut body).unwrap();
        }
        while let Some(pos) = body.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = body.drain(..=pos).collect();
            lines.push(String::from_utf8(line).unwrap().trim_end().to_string());
        }
        if !chunked {
            if !body.is_empty() {
                lines.push(String::from_utf8(std::mem::take(&mut body)).unwrap());
            }
            break;
        }
    }
    (head, lines)
}

#[tokio::test]
async fn watch_is_chunked_ndjson() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(service("a", &[])).unwrap();
    let rv = server.current_resource_version();
    let server = std::sync::Arc::new(server);
    let s = server.clone();
    let reader = tokio::task::spawn_blocking(move || {
        raw_get(
            &s,
            &format!("/api/v1/services?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"),
            3,
        )
    });
    assert!(server.wait_for_watches(1, STEP).await);
    server.apply(service("b", &[])).unwrap();
    server.delete(ResourceKind::Service, "default", "a");
    server.send_bookmarks();
    let (head, lines) = reader.await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["kind"], "Service");
    assert_eq!(events[0]["object"]["apiVersion"], "v1");
    assert_eq!(events[0]["object"]["metadata"]["name"], "b");
    assert_eq!(events[1]["type"], "DELETED");
    assert_eq!(events[1]["object"]["metadata"]["name"], "a");
    assert_eq!(events[2]["type"], "BOOKMARK");
    assert_eq!(events[2]["object"]["kind"], "Service");
    assert_eq!(
        events[2]["object"]["metadata"]["resourceVersion"],
        server.current_resource_version()
    );
}

#[tokio::test]
async fn list_shape() {
    let server = FakeApiServer::start().await.unwrap();
    server
        .apply(endpoint_slice("s", "web", "10.0.0.1"))
        .unwrap();
    let s = std::sync::Arc::new(server);
    let s2 = s.clone();
    let (head, lines) = tokio::task::spawn_blocking(move || {
        raw_get(&s2, "/apis/discovery.k8s.io/v1/endpointslices", 1)
    })
    .await
    .unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let list: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(list["kind"], "EndpointSliceList");
    assert_eq!(list["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        s.current_resource_version()
    );
    assert_eq!(list["items"][0]["kind"], "EndpointSlice");
    assert_eq!(list["items"][0]["metadata"]["resourceVersion"], "2");
}

#[tokio::test]
async fn too_old_resource_version_gets_410_event() {
    let server = FakeApiServer::builder()
        .history_limit(2)
        .start()
        .await
        .unwrap();
    for i in 0..5 {
        server.apply(service(&format!("s{i}"), &[])).unwrap();
    }
    let api: Api<Service> = Api::all(client(&server).await);
    let mut stream = api
        .watch(&WatchParams::default(), "2")
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(status)) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
            assert!(status.message.contains("too old resource version"));
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        stream.try_next().await.unwrap().is_none(),
        "the stream ends after the error"
    );

    // Within the retained history: replayed.
    let rv = (server.current_resource_version().parse::<u64>().unwrap() - 2).to_string();
    let mut stream = api
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .boxed();
    let mut names = Vec::new();
    while let Some(event) = stream.try_next().await.unwrap() {
        match event {
            WatchEvent::Added(s) => names.push(s.name_any()),
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(names, ["s3", "s4"]);
}

#[tokio::test]
async fn watch_timeout_and_bookmarks() {
    let server = FakeApiServer::builder()
        .bookmark_interval(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    server.apply(service("a", &[])).unwrap();
    let rv = server.current_resource_version();
    let api: Api<Service> = Api::all(client(&server).await);

    let started = Instant::now();
    let events: Vec<_> = api
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let bookmarks: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Bookmark(b) => Some(b.metadata.resource_version.clone()),
            _ => None,
        })
        .collect();
    assert!(bookmarks.len() >= 5, "{} bookmarks", bookmarks.len());
    assert!(bookmarks.iter().all(|b| *b == rv));

    // Without allowWatchBookmarks, none.
    let events: Vec<_> = api
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), &rv)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn get_and_not_found() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(service_in("ns1", "web", &[])).unwrap();
    let client = client(&server).await;
    let api: Api<Service> = Api::namespaced(client.clone(), "ns1");
    let svc = api.get("web").await.unwrap();
    assert_eq!(svc.namespace().as_deref(), Some("ns1"));
    match api.get("nope").await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 404);
            assert_eq!(status.reason, "NotFound");
        }
        other => panic!("expected 404, got {other:?}"),
    }
    assert!(api.get_opt("nope").await.unwrap().is_none());
    assert_eq!(server.get_count(ResourceKind::Service), 3);
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
}

#[tokio::test]
async fn namespaces_filter_lists_and_watches() {
    let server = FakeApiServer::start().await.unwrap();
    for ns in ["a", "b", "c"] {
        server.apply(service_in(ns, "web", &[])).unwrap();
        server.apply(service_in(ns, "db", &[])).unwrap();
    }
    let client = client(&server).await;
    let api: Api<Service> = Api::namespaced(client.clone(), "b");
    let list = api.list(&ListParams::default()).await.unwrap();
    let names: Vec<String> = list
        .items
        .iter()
        .map(|s| format!("{}/{}", s.namespace().unwrap(), s.name_any()))
        .collect();
    assert_eq!(names, ["b/db", "b/web"]);

    let rv = list.metadata.resource_version.unwrap();
    let mut stream = api
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .unwrap()
        .boxed();
    server.apply(service_in("a", "new", &[])).unwrap();
    server.apply(service_in("b", "new", &[])).unwrap();
    server.delete(ResourceKind::Service, "c", "web");
    server.delete(ResourceKind::Service, "b", "web");
    let mut seen = Vec::new();
    while let Some(event) = stream.try_next().await.unwrap() {
        match event {
            WatchEvent::Added(s) => {
                seen.push(format!("ADDED {}/{}", s.namespace().unwrap(), s.name_any()))
            }
            WatchEvent::Deleted(s) => seen.push(format!(
                "DELETED {}/{}",
                s.namespace().unwrap(),
                s.name_any()
            )),
            WatchEvent::Modified(s) => seen.push(format!("MODIFIED {}", s.name_any())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen, ["ADDED b/new", "DELETED b/web"]);
    assert_eq!(
        server.requests().last().unwrap().namespace.as_deref(),
        Some("b")
    );
}

#[tokio::test]
async fn selectors() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(service("plain", &[])).unwrap();
    server
        .apply(service("web", &[("app", "web"), ("tier", "fe")]))
        .unwrap();
    server.apply(service("db", &[("app", "db")])).unwrap();
    let api: Api<Service> = Api::all(client(&server).await);
    let names = |list: kube::core::ObjectList<Service>| -> Vec<String> {
        list.items.iter().map(|s| s.name_any()).collect()
    };
    let q = |s: &str| ListParams::default().labels(s);
    assert_eq!(names(api.list(&q("app=web")).await.unwrap()), ["web"]);
    assert_eq!(names(api.list(&q("app==db")).await.unwrap()), ["db"]);
    assert_eq!(
        names(api.list(&q("app!=web")).await.unwrap()),
        ["db", "plain"]
    );
    assert_eq!(names(api.list(&q("app")).await.unwrap()), ["db", "web"]);
    assert_eq!(names(api.list(&q("!app")).await.unwrap()), ["plain"]);
    assert_eq!(names(api.list(&q("app,!tier")).await.unwrap()), ["db"]);
    assert_eq!(
        names(api.list(&q("app in (web,db),tier")).await.unwrap()),
        ["web"]
    );
    let by_name = ListParams::default().fields("metadata.name=db");
    assert_eq!(names(api.list(&by_name).await.unwrap()), ["db"]);
    match api.list(&q("app in (")).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 400),
        other => panic!("expected 400, got {other:?}"),
    }
    match api
        .list(&ListParams::default().fields("spec.clusterIP=x"))
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 400),
        other => panic!("expected 400, got {other:?}"),
    }
}

#[tokio::test]
async fn list_resource_version_semantics() {
    let server = FakeApiServer::start().await.unwrap();
    for i in 0..6 {
        server.apply(service(&format!("s{i}"), &[])).unwrap();
    }
    let api: Api<Service> = Api::all(client(&server).await);
    let snapshot = server.current_resource_version();

    // Paginate while the store changes: every page is served from the first page's snapshot.
    let page1 = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page1.metadata.remaining_item_count, Some(4));
    server.delete(ResourceKind::Service, "default", "s4");
    server.apply(service("s25", &[])).unwrap();
    let mut names: Vec<String> = page1.items.iter().map(|s| s.name_any()).collect();
    let mut token = page1.metadata.continue_;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = api
            .list(&ListParams::default().limit(2).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version.as_deref(),
            Some(snapshot.as_str())
        );
        names.extend(page.items.iter().map(|s| s.name_any()));
        token = page.metadata.continue_;
    }
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4", "s5"]);

    // Exact read at the old snapshot; NotOlderThan/any read at the current state.
    let exact = api
        .list(
            &ListParams::default()
                .at(&snapshot)
                .matching(VersionMatch::Exact),
        )
        .await
        .unwrap();
    assert_eq!(exact.items.len(), 6);
    assert_eq!(
        exact.metadata.resource_version.as_deref(),
        Some(snapshot.as_str())
    );
    let any = api.list(&ListParams::default().match_any()).await.unwrap();
    assert_eq!(any.items.len(), 6);
    assert_eq!(
        any.metadata.resource_version,
        Some(server.current_resource_version())
    );
    assert!(any.items.iter().any(|s| s.name_any() == "s25"));

    // After compaction: the old snapshot is gone.
    server.expire_watches();
    match api
        .list(
            &ListParams::default()
                .at(&snapshot)
                .matching(VersionMatch::Exact),
        )
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn service_unavailable_mode_is_retried_by_the_client() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(service("a", &[])).unwrap();
    let api: Api<Service> = Api::all(client(&server).await);
    server.set_unavailable_with(Some(Unavailability::ServiceUnavailable));
    let list = tokio::spawn(async move { api.list(&ListParams::default()).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        server.list_count(ResourceKind::Service) >= 2,
        "the client retried the 503"
    );
    server.set_unavailable(false);
    let list = tokio::time::timeout(STEP, list)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(list.items.len(), 1);
}

#[tokio::test]
async fn reset_mode_fails_requests_fast() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<EndpointSlice> = Api::all(client(&server).await);
    api.list(&ListParams::default()).await.unwrap();
    server.set_unavailable(true);
    let started = Instant::now();
    let result = api.list(&ListParams::default()).await;
    assert!(
        matches!(
            result,
            Err(kube::Error::HyperError(_) | kube::Error::Service(_))
        ),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    server.set_unavailable(false);
    api.list(&ListParams::default()).await.unwrap();
}

#[tokio::test]
async fn bulk_apply_validates_everything_first() {
    let server = FakeApiServer::start().await.unwrap();
    let objs = vec![
        serde_json::to_value(service("a", &[])).unwrap(),
        serde_json::json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "p"}}),
    ];
    assert!(matches!(
        server.bulk_apply(objs),
        Err(fake_apiserver::Error::UnsupportedKind(_))
    ));
    assert_eq!(server.object_count(ResourceKind::Service), 0);
    assert_eq!(server.current_resource_version(), "1");
    // No-op updates do not bump the resourceVersion.
    let rv = server.apply(service("a", &[])).unwrap();
    assert_eq!(server.apply(service("a", &[])).unwrap(), rv);
    assert_eq!(server.current_resource_version(), rv);
}

#[tokio::test]
async fn binary_serves_a_directory() {
    let dir = std::env::temp_dir().join(format!("fake-apiserver-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("objects.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  clusterIP: 10.96.0.1\n  ports:\n  - port: 80\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: skipped\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\naddressType: IPv4\nendpoints: []\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fake-apiserver"))
        .arg("--dir")
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut url = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    let url = url.trim().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url:?}");

    let config = kube::Config::new(url.parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await;
    let slices = Api::<EndpointSlice>::all(client)
        .list(&ListParams::default())
        .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(services.unwrap().items[0].name_any(), "web");
    assert_eq!(slices.unwrap().items[0].name_any(), "web-1");
}
