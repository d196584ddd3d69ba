use std::sync::Arc;

use super::*;
use crate::{
    dns::records::{DnsPort, DnsService, Endpoint, Facts, ServiceKind},
    model::ObjectRef,
};

fn zone() -> Zone {
    Zone {
        domain: "cluster.local".into(),
        ttl: 5,
    }
}

fn port(name: &str, port: u16) -> DnsPort {
    DnsPort {
        name: Arc::from(name),
        port,
        protocol: Protocol::Tcp,
        target: None,
    }
}

fn own(kind: ServiceKind, ports: Vec<DnsPort>, endpoints: Vec<Endpoint>) -> Option<ServiceRecords> {
    Some(ServiceRecords {
        facts: Facts::Own(Arc::new(DnsService {
            kind,
            ports: ports.into_boxed_slice(),
        })),
        endpoints: endpoints.into_boxed_slice(),
    })
}

fn index() -> DnsIndex {
    let mut index = DnsIndex::default();
    let ports: Arc<[(Arc<str>, u16, Protocol)]> =
        Arc::from(vec![(Arc::from("sql"), 3306, Protocol::Tcp)]);
    let headless = ServiceKind::Headless {
        publish_not_ready: false,
        selector: None,
    };
    index.apply(vec![
        (
            ObjectRef::new("default", "web"),
            own(
                ServiceKind::ClusterIps(Box::new(["10.96.0.5".parse().unwrap()])),
                vec![port("http", 80)],
                vec![],
            ),
        ),
        (
            ObjectRef::new("prod", "db"),
            own(
                headless.clone(),
                vec![port("sql", 3306)],
                vec![
                    Endpoint {
                        ip: "10.244.0.7".parse().unwrap(),
                        hostname: Box::from("db-0"),
                        ports: Arc::clone(&ports),
                    },
                    Endpoint {
                        ip: "10.244.0.8".parse().unwrap(),
                        hostname: Box::from("10-244-0-8"),
                        ports,
                    },
                ],
            ),
        ),
        (
            ObjectRef::new("prod", "empty"),
            own(headless, vec![port("sql", 3306)], vec![]),
        ),
        (
            ObjectRef::new("default", "ext"),
            own(
                ServiceKind::ExternalName(Box::from("web.default.svc.cluster.local")),
                vec![],
                vec![],
            ),
        ),
    ]);
    index
}

fn answer(name: &str, qtype: RecordType) -> (bool, Vec<String>) {
    match resolve(&index(), &zone(), name, qtype) {
        Resolution::Authoritative {
            nxdomain, answers, ..
        } => (
            nxdomain,
            answers.iter().map(|r| r.data.to_string()).collect(),
        ),
        Resolution::NotOurs => panic!("{name} not ours"),
    }
}

#[test]
fn cluster_ip_service() {
    assert_eq!(
        answer("web.default.svc.cluster.local.", RecordType::A),
        (false, vec!["10.96.0.5".to_string()])
    );
    // The name exists: NODATA for another type.
    assert_eq!(
        answer("web.default.svc.cluster.local.", RecordType::AAAA),
        (false, vec![])
    );
    assert_eq!(
        answer("nope.default.svc.cluster.local.", RecordType::A),
        (true, vec![])
    );
    assert_eq!(
        answer("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV),
        (
            false,
            vec!["0 100 80 web.default.svc.cluster.local.".to_string()]
        )
    );
    assert!(answer("_x._tcp.web.default.svc.cluster.local.", RecordType::SRV).0);
}

#[test]
fn headless_service() {
    let (nx, mut ips) = answer("db.prod.svc.cluster.local.", RecordType::A);
    ips.sort();
    assert_eq!(
        (nx, ips),
        (false, vec!["10.244.0.7".into(), "10.244.0.8".into()])
    );
    assert_eq!(
        answer("db-0.db.prod.svc.cluster.local.", RecordType::A),
        (false, vec!["10.244.0.7".to_string()])
    );
    assert!(answer("db-9.db.prod.svc.cluster.local.", RecordType::A).0);
    assert_eq!(
        answer("_sql._tcp.db.prod.svc.cluster.local.", RecordType::SRV)
            .1
            .len(),
        2
    );
    // No ready endpoint: no name (the specification's NXDOMAIN).
    assert!(answer("empty.prod.svc.cluster.local.", RecordType::A).0);
}

#[test]
fn namespaces_zone_and_version() {
    assert_eq!(
        answer("prod.svc.cluster.local.", RecordType::A),
        (false, vec![])
    );
    assert_eq!(
        answer("nons.svc.cluster.local.", RecordType::A),
        (true, vec![])
    );
    assert_eq!(answer("svc.cluster.local.", RecordType::A), (false, vec![]));
    assert_eq!(answer("cluster.local.", RecordType::A), (false, vec![]));
    assert_eq!(answer("foo.cluster.local.", RecordType::A), (true, vec![]));
    assert_eq!(
        answer("dns-version.cluster.local.", RecordType::TXT),
        (false, vec![SCHEMA_VERSION.to_string()])
    );
    assert_eq!(
        answer("10-244-0-9.prod.pod.cluster.local.", RecordType::A),
        (false, vec!["10.244.0.9".to_string()])
    );
}

#[test]
fn reverse_and_external_name() {
    assert_eq!(
        answer("5.0.96.10.in-addr.arpa.", RecordType::PTR),
        (false, vec!["web.default.svc.cluster.local.".to_string()])
    );
    assert_eq!(
        answer("7.0.244.10.in-addr.arpa.", RecordType::PTR),
        (false, vec!["db-0.db.prod.svc.cluster.local.".to_string()])
    );
    assert_eq!(
        resolve(&index(), &zone(), "9.9.9.9.in-addr.arpa.", RecordType::PTR),
        Resolution::NotOurs
    );
    assert_eq!(
        resolve(&index(), &zone(), "example.com.", RecordType::A),
        Resolution::NotOurs
    );
    // An in-zone target is followed once.
    assert_eq!(
        answer("ext.default.svc.cluster.local.", RecordType::A),
        (
            false,
            vec![
                "web.default.svc.cluster.local.".to_string(),
                "10.96.0.5".to_string()
            ]
        )
    );
}
