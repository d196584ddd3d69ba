//! Object validation and translation on any manifest: the objects the parser makes of the
//! text go through the reconcile core into the in-memory maps (which check after every
//! operation that no master names a missing slot or backend), are synced, then deleted,
//! which must leave the maps empty.
#![no_main]

use std::{sync::Arc, time::Instant};

use lb_agent::{
    reconcile::{Reconciler, SyncKind},
    source::{change::Change, manifests::parse_manifest},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_manifest("fuzz.yaml", text);
    let mut reconciler = Reconciler::on_fake_maps(Some("node-a".to_string()));
    let mut ids = Vec::new();
    for object in parsed.objects {
        ids.push((object.kind(), object.id()));
        reconciler.apply(Change::Apply {
            origin: Arc::from("fuzz.yaml"),
            object,
        });
    }
    reconciler
        .sync(SyncKind::Full, Instant::now())
        .expect("the fake maps take every write");
    let _ = reconciler.state().problems();
    for (kind, id) in ids {
        reconciler.apply(Change::Delete { kind, id });
    }
    reconciler
        .sync(SyncKind::Changes, Instant::now())
        .expect("the fake maps take every write");
    let maps = reconciler.writer().maps();
    assert!(
        maps.services.is_empty() && maps.backends.is_empty(),
        "everything deleted, yet the maps hold {:?} {:?}",
        maps.services,
        maps.backends
    );
});
