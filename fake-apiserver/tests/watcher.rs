//! kube-runtime's `watcher` (default config, default backoff) against the fake server: the
//! way the node agent consumes Services and EndpointSlices.

mod common;

use std::time::Duration;

use common::*;
use fake_apiserver::{FakeApiServer, ResourceKind, Verb};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, ResourceExt};

const AGENT_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

#[tokio::test]
async fn watcher_sees_create_update_delete() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(service("a", &[])).unwrap();
    server.apply(service("b", &[])).unwrap();
    let api: Api<Service> = Api::all(client(&server).await);
    let mut w = spawn(watcher(api, watcher::Config::default()).default_backoff());
    let mut errors = Vec::new();
    assert_eq!(
        w.take_ok(4, &mut errors).await,
        ["Init", "InitApply(a)", "InitApply(b)", "InitDone"]
    );

    let rv = server.apply(service("c", &[])).unwrap();
    match w.next_ok(&mut errors).await {
        watcher::Event::Apply(svc) => {
            assert_eq!(svc.name_any(), "c");
            assert_eq!(svc.resource_version(), Some(rv));
            assert!(svc.uid().is_some());
            assert!(svc.metadata.creation_timestamp.is_some());
            assert_eq!(svc.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.10"));
        }
        other => panic!("unexpected {}", describe(&other)),
    }

    let rv = server.apply(service("c", &[("app", "web")])).unwrap();
    match w.next_ok(&mut errors).await {
        watcher::Event::Apply(svc) => {
            assert_eq!(svc.labels().get("app").map(String::as_str), Some("web"));
            assert_eq!(svc.resource_version(), Some(rv));
        }
        other => panic!("unexpected {}", describe(&other)),
    }

    let rv = server
        .delete(ResourceKind::Service, "default", "c")
        .unwrap();
    match w.next_ok(&mut errors).await {
        watcher::Event::Delete(svc) => {
            assert_eq!(svc.name_any(), "c");
            assert_eq!(svc.resource_version(), Some(rv));
        }
        other => panic!("unexpected {}", describe(&other)),
    }
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(server.list_count(ResourceKind::Service), 1);
    assert_eq!(server.watch_count(ResourceKind::Service), 1);
}

#[tokio::test]
async fn endpointslice_watcher_works() {
    let server = FakeApiServer::start().await.unwrap();
    server
        .apply(endpoint_slice("web-1", "web", "10.0.0.1"))
        .unwrap();
    let api: Api<EndpointSlice> = Api::all(client(&server).await);
    let mut w = spawn(watcher(api, watcher::Config::default()).default_backoff());
    let mut errors = Vec::new();
    assert_eq!(
        w.take_ok(3, &mut errors).await,
        ["Init", "InitApply(web-1)", "InitDone"]
    );
    server
        .apply(endpoint_slice("web-1", "web", "10.0.0.2"))
        .unwrap();
    match w.next_ok(&mut errors).await {
        watcher::Event::Apply(slice) => {
            assert_eq!(slice.endpoints.unwrap()[0].addresses, ["10.0.0.2"]);
            // An endpoints change bumps the generation.
            assert_eq!(slice.metadata.generation, Some(2));
        }
        other => panic!("unexpected {}", describe(&other)),
    }
    // A Service change is not sent to an EndpointSlice watch.
    server.apply(service("web", &[])).unwrap();
    server.delete(ResourceKind::EndpointSlice, "default", "web-1");
    assert_eq!(w.take_ok(1, &mut errors).await, ["Delete(web-1)"]);
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test]
async fn label_selector_watch_filters() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(service("plain", &[])).unwrap();
    server
        .apply(service(
            "headless",
            &[("service.kubernetes.io/headless", "")],
        ))
        .unwrap();
    server
        .apply(service(
            "other-proxy",
            &[("service.kubernetes.io/service-proxy-name", "x")],
        ))
        .unwrap();
    let api: Api<Service> = Api::all(client(&server).await);
    let config = watcher::Config::default().labels(AGENT_SELECTOR);
    let mut w = spawn(watcher(api, config).default_backoff());
    let mut errors = Vec::new();
    assert_eq!(
        w.take_ok(3, &mut errors).await,
        ["Init", "InitApply(plain)", "InitDone"]
    );

    // Starts matching → ADDED; stops matching → DELETED; never matches → nothing.
    server
        .apply(service("plain", &[("service.kubernetes.io/headless", "")]))
        .unwrap();
    server.apply(service("headless", &[])).unwrap();
    server
        .apply(service(
            "new-proxy",
            &[("service.kubernetes.io/service-proxy-name", "y")],
        ))
        .unwrap();
    server.apply(service("new-plain", &[("app", "x")])).unwrap();
    assert_eq!(
        w.take_ok(3, &mut errors).await,
        ["Delete(plain)", "Apply(headless)", "Apply(new-plain)"]
    );
    assert!(errors.is_empty(), "{errors:?}");

    let watch = server.requests_for(ResourceKind::Service, Verb::Watch);
    assert_eq!(watch[0].param("labelSelector"), Some(AGENT_SELECTOR));
    let list = server.requests_for(ResourceKind::Service, Verb::List);
    assert_eq!(list[0].param("labelSelector"), Some(AGENT_SELECTOR));
}

/// The requests kube-runtime 5's watcher sends with its default config: a LIST with
/// `limit=500` (no resourceVersion: a consistent "most recent" read), then a WATCH from the
/// list's resourceVersion with bookmarks and a 290 s timeout; no streaming list.
#[tokio::test]
async fn watcher_request_parameters() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(service("a", &[])).unwrap();
    let list_rv = server.current_resource_version();
    let api: Api<Service> = Api::all(client(&server).await);
    let mut w = spawn(watcher(api, watcher::Config::default()).default_backoff());
    let mut errors = Vec::new();
    w.take_ok(3, &mut errors).await;
    assert!(server.wait_for_watches(1, STEP).await);

    let lists = server.requests_for(ResourceKind::Service, Verb::List);
    assert_eq!(lists.len(), 1);
    assert_eq!(lists[0].path, "/api/v1/services");
    assert_eq!(lists[0].query, [("limit".to_string(), "500".to_string())]);

    let watches = server.requests_for(ResourceKind::Service, Verb::Watch);
    assert_eq!(watches.len(), 1);
    let q: Vec<(&str, &str)> = watches[0]
        .query
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        q,
        [
            ("watch", "true"),
            ("timeoutSeconds", "290"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", list_rv.as_str()),
        ]
    );
}

#[tokio::test]
async fn paginated_initial_list() {
    let server = FakeApiServer::start().await.unwrap();
    server
        .bulk_apply((0..1200).map(|i| service(&format!("svc-{i:05}"), &[])))
        .unwrap();
    let api: Api<Service> = Api::all(client(&server).await);
    let mut w = spawn(watcher(api, watcher::Config::default()).default_backoff());
    let mut errors = Vec::new();
    let events = w.take_ok(1202, &mut errors).await;
    assert_eq!(events[0], "Init");
    assert_eq!(events[1], "InitApply(svc-00000)");
    assert_eq!(events[1200], "InitApply(svc-01199)");
    assert_eq!(events[1201], "InitDone");
    // 500 + 500 + 200.
    assert_eq!(server.list_count(ResourceKind::Service), 3);
    let lists = server.requests_for(ResourceKind::Service, Verb::List);
    assert!(lists[0].param("continue").is_none());
    assert!(lists[1].param("continue").is_some());
    assert!(lists[2].param("continue").is_some());
}

#[tokio::test]
async fn expire_watches_forces_relist() {
    let server = FakeApiServer::start().await.unwrap();
    for name in ["a", "b", "c"] {
        server.apply(service(name, &[])).unwrap();
    }
    let api: Api<Service> = Api::all(client(&server).await);
    let mut w = spawn(watcher(api, watcher::Config::default()).default_backoff());
    let mut errors = Vec::new();
    assert_eq!(
        w.take_ok(5, &mut errors).await,
        [
            "Init",
            "InitApply(a)",
            "InitApply(b)",
            "InitApply(c)",
            "InitDone"
        ]
    );
    assert!(server.wait_for_watches(1, STEP).await);
    assert_eq!(server.list_count(ResourceKind::Service), 1);

    server.expire_watches();
    // The 410 ERROR event surfaces as a watcher error, then the watcher relists.
    match w.next().await {
        Err(watcher::Error::WatchError(status)) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected a 410 watch error, got {other:?}"),
    }
    assert_eq!(
        w.take_ok(5, &mut errors).await,
        [
            "Init",
            "InitApply(a)",
            "InitApply(b)",
            "InitApply(c)",
            "InitDone"
        ]
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(server.list_count(ResourceKind::Service), 2);
    // And it watches again, from the relist's version.
    server.apply(service("d", &[])).unwrap();
    assert_eq!(w.take_ok(1, &mut errors).await, ["Apply(d)"]);
    assert_eq!(server.watch_count(ResourceKind::Service), 2);
}

#[tokio::test]
async fn dropped_connections_resume_without_relist() {
    // No periodic bookmarks: the resume version is then exactly the last event's.
    let server = FakeApiServer::builder()
        .bookmark_interval(Duration::ZERO)
        .start()
        .await
        .unwrap();
    server.apply(service("a", &[])).unwrap();
    let api: Api<Service> = Api::all(client(&server).await);
    let mut w = spawn(watcher(api, watcher::Config::default()).default_backoff());
    let mut errors = Vec::new();
    w.take_ok(3, &mut errors).await;
    let rv_b = server.apply(service("b", &[])).unwrap();
    assert_eq!(w.take_ok(1, &mut errors).await, ["Apply(b)"]);
    assert!(server.wait_for_watches(1, STEP).await);

    server.drop_connections();
    // Changes made while the watch is down are replayed from the history.
    server.apply(service("c", &[])).unwrap();
    server.delete(ResourceKind::Service, "default", "a");
    assert_eq!(w.take_ok(2, &mut errors).await, ["Apply(c)", "Delete(a)"]);
    assert_eq!(server.list_count(ResourceKind::Service), 1, "no relist");
    assert_eq!(server.watch_count(ResourceKind::Service), 2);
    let watches = server.requests_for(ResourceKind::Service, Verb::Watch);
    assert_eq!(watches[1].param("resourceVersion"), Some(rv_b.as_str()));
    // kube-client classifies the abrupt end as a resumable EOF: no error surfaces.
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test]
async fn bookmarks_advance_the_resume_version() {
    let server = FakeApiServer::builder()
        .bookmark_interval(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    server.apply(service("a", &[])).unwrap();
    let api: Api<Service> = Api::all(client(&server).await);
    let mut w = spawn(watcher(api, watcher::Config::default()).default_backoff());
    let mut errors = Vec::new();
    w.take_ok(3, &mut errors).await;
    assert!(server.wait_for_watches(1, STEP).await);

    // EndpointSlice changes bump the global resourceVersion without any Service event;
    // the Service watch learns the new version from bookmarks only.
    server.apply(endpoint_slice("s1", "a", "10.0.0.1")).unwrap();
    let rv = server.apply(endpoint_slice("s2", "a", "10.0.0.2")).unwrap();
    // The watcher consumes bookmarks internally; let a few pass, then make it resume.
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.drop_connections();
    server.apply(service("b", &[])).unwrap();
    assert_eq!(w.take_ok(1, &mut errors).await, ["Apply(b)"]);
    let watches = server.requests_for(ResourceKind::Service, Verb::Watch);
    assert_eq!(watches.len(), 2);
    assert_eq!(watches[1].param("resourceVersion"), Some(rv.as_str()));
    assert_eq!(server.list_count(ResourceKind::Service), 1);
}

#[tokio::test]
async fn unavailable_then_recovery_converges() {
    let server = FakeApiServer::start().await.unwrap();
    for name in ["a", "b"] {
        server.apply(service(name, &[])).unwrap();
    }
    let api: Api<Service> = Api::all(client(&server).await);
    let (reader, writer) = reflector::store::<Service>();
    let mut errors = Vec::new();
    let mut w =
        spawn(reflector(writer, watcher(api, watcher::Config::default())).default_backoff());
    w.take_ok(4, &mut errors).await;
    assert!(server.wait_for_watches(1, STEP).await);

    server.set_unavailable(true);
    server.apply(service("c", &[])).unwrap();
    server.delete(ResourceKind::Service, "default", "a");
    // The watcher keeps failing (connection reset) while unavailable.
    let mut failures = 0;
    let outage = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Some(item) = w.next_within(outage - tokio::time::Instant::now()).await {
        match item {
            Err(_) => failures += 1,
            Ok(ev) => panic!("unexpected event while unavailable: {}", describe(&ev)),
        }
    }
    assert!(failures >= 1, "the watcher saw no failure");
    server.set_unavailable(false);

    // Recovery: resumes from its last version; the history still holds the changes.
    let expected: Vec<String> = vec!["b".into(), "c".into()];
    let drive = async {
        loop {
            if w.next().await.is_ok() {
                let mut names: Vec<String> = reader.state().iter().map(|s| s.name_any()).collect();
                names.sort();
                if names == expected {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(STEP, drive)
        .await
        .expect("converged after recovery");
    assert_eq!(
        server.list_count(ResourceKind::Service),
        1,
        "resumed without relist"
    );
}

#[tokio::test]
async fn unavailable_with_compaction_relists_and_converges() {
    let server = FakeApiServer::start().await.unwrap();
    for name in ["a", "b"] {
        server.apply(service(name, &[])).unwrap();
    }
    let api: Api<Service> = Api::all(client(&server).await);
    let (reader, writer) = reflector::store::<Service>();
    let mut errors = Vec::new();
    let mut w =
        spawn(reflector(writer, watcher(api, watcher::Config::default())).default_backoff());
    w.take_ok(4, &mut errors).await;
    assert!(server.wait_for_watches(1, STEP).await);

    server.set_unavailable(true);
    server.delete(ResourceKind::Service, "default", "a");
    server.apply(service("z", &[])).unwrap();
    // While the watch is down the history is compacted: the resumed watch gets 410.
    server.expire_watches();
    let _ = w.next_within(Duration::from_millis(500)).await;
    server.set_unavailable(false);

    let drive = async {
        loop {
            if let Ok(watcher::Event::InitDone) = w.next().await {
                let mut names: Vec<String> = reader.state().iter().map(|s| s.name_any()).collect();
                names.sort();
                return names;
            }
        }
    };
    let names = tokio::time::timeout(STEP, drive).await.expect("relisted");
    assert_eq!(names, ["b", "z"]);
    assert_eq!(server.list_count(ResourceKind::Service), 2);
    let watches = server.requests_for(ResourceKind::Service, Verb::Watch);
    assert!(watches.len() >= 2);
}

#[tokio::test]
async fn streaming_list_watcher() {
    let server = FakeApiServer::start().await.unwrap();
    for name in ["a", "b"] {
        server.apply(service(name, &[])).unwrap();
    }
    server
        .apply(service("h", &[("service.kubernetes.io/headless", "")]))
        .unwrap();
    let api: Api<Service> = Api::all(client(&server).await);
    let config = watcher::Config::default()
        .streaming_lists()
        .labels(AGENT_SELECTOR);
    let mut w = spawn(watcher(api, config).default_backoff());
    let mut errors = Vec::new();
    assert_eq!(
        w.take_ok(4, &mut errors).await,
        ["Init", "InitApply(a)", "InitApply(b)", "InitDone"]
    );
    server.apply(service("c", &[])).unwrap();
    assert_eq!(w.take_ok(1, &mut errors).await, ["Apply(c)"]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(server.list_count(ResourceKind::Service), 0);
    let watches = server.requests_for(ResourceKind::Service, Verb::Watch);
    assert_eq!(watches[0].param("sendInitialEvents"), Some("true"));
    assert_eq!(
        watches[0].param("resourceVersionMatch"),
        Some("NotOlderThan")
    );
    assert_eq!(watches[0].param("resourceVersion"), Some("0"));

    // A 410 during streaming-list mode restarts with a new initial watch.
    server.expire_watches();
    assert!(matches!(w.next().await, Err(watcher::Error::WatchError(s)) if s.code == 410));
    assert_eq!(
        w.take_ok(5, &mut errors).await,
        [
            "Init",
            "InitApply(a)",
            "InitApply(b)",
            "InitApply(c)",
            "InitDone"
        ]
    );
}

#[tokio::test]
async fn large_store_lists_fast() {
    let server = FakeApiServer::start().await.unwrap();
    let start = std::time::Instant::now();
    server
        .bulk_apply(
            (0..10_000).map(|i| service_in(&format!("ns-{}", i % 50), &format!("svc-{i}"), &[])),
        )
        .unwrap();
    server
        .bulk_apply(
            (0..10_000)
                .map(|i| endpoint_slice(&format!("slice-{i}"), &format!("svc-{i}"), "10.0.0.1")),
        )
        .unwrap();
    let setup = start.elapsed();
    assert_eq!(server.object_count(ResourceKind::Service), 10_000);
    assert_eq!(server.object_count(ResourceKind::EndpointSlice), 10_000);

    let client = client(&server).await;
    let start = std::time::Instant::now();
    let all = Api::<Service>::all(client.clone())
        .list(&Default::default())
        .await
        .unwrap();
    let unpaginated = start.elapsed();
    assert_eq!(all.items.len(), 10_000);

    // The agent's way: the watcher's paginated initial list (20 pages of 500).
    let start = std::time::Instant::now();
    let mut w = spawn(watcher(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default(),
    ));
    let mut n = 0;
    loop {
        match w.next().await.unwrap() {
            watcher::Event::InitApply(_) => n += 1,
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    let paginated = start.elapsed();
    assert_eq!(n, 10_000);
    assert_eq!(server.list_count(ResourceKind::EndpointSlice), 20);
    eprintln!(
        "setup {setup:?}, LIST 10k services {unpaginated:?}, watcher initial list of 10k slices {paginated:?}"
    );
    assert!(unpaginated < Duration::from_secs(5), "{unpaginated:?}");
}
