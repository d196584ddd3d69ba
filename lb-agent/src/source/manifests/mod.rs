//! The embedded source: a directory of Kubernetes YAML (`*.yaml`, `*.yml`, multi-document,
//! `v1` `List`s) holding Services, EndpointSlices, Pods and Nodes (the one named like
//! `--node-name` is this node's), watched for changes.
//!
//! [`parse`] turns text into objects, [`dir`] remembers per file only what telling changes
//! apart needs (per document a hash of its text and the identities of its objects), and
//! [`watch`] reports changes as they happen.
mod dir;
mod parse;
mod watch;

use std::{path::Path, sync::Arc};

pub use self::{
    dir::{DEFAULT_MAX_FILE_SIZE, ManifestDir},
    parse::{ParsedFile, parse_manifest},
    watch::{Changed, Changes, DirWatcher, watch},
};
// The source's changes are the one change type of every source.
use super::change::Kind;
pub use super::change::{Change as Update, Object};

/// Kind, namespace and name: what makes two objects the same object.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Identity {
    kind: Kind,
    namespace: Arc<str>,
    name: Box<str>,
}

impl Object {
    /// Kind, namespace (`default` when unset; empty for the cluster-scoped Node) and name.
    fn identity(&self) -> (Kind, &str, &str) {
        let meta = match self {
            Self::Service(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::Node(o) => &o.metadata,
        };
        let kind = self.kind();
        let namespace = match self {
            // Cluster-scoped.
            Self::Node(_) => "",
            _ => meta.namespace.as_deref().unwrap_or("default"),
        };
        (kind, namespace, meta.name.as_deref().unwrap_or_default())
    }
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let yaml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e == "yaml" || e == "yml");
    !hidden && yaml
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// `(kind, namespace, name)` of an object, owned, for comparisons.
    fn id(object: &Object) -> (&'static str, String, String) {
        let (kind, namespace, name) = object.identity();
        (kind_name(kind), namespace.to_owned(), name.to_owned())
    }

    fn kind_name(kind: Kind) -> &'static str {
        match kind {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Node => "Node",
        }
    }

    fn problems(text: &str) -> Vec<String> {
        parse_manifest("f.yaml", text)
            .problems
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn multi_document_files_lists_and_other_kinds() {
        let text = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: webapp1}
---
apiVersion: extensions/v1beta1
kind: Deployment
metadata: {name: old}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.1}}
- {apiVersion: v1, kind: Pod, metadata: {name: p, namespace: ns}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-1}
addressType: IPv4
endpoints: []
---
";
        let parsed = parse_manifest("f.yaml", text);
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        let kinds: Vec<_> = parsed.objects.iter().map(id).collect();
        assert_eq!(
            kinds,
            [
                ("Service", "default".into(), "a".into()),
                ("Pod", "ns".into(), "p".into()),
                ("EndpointSlice", "default".into(), "a-1".into()),
            ]
        );
    }

    #[test]
    fn this_nodes_node_gives_zone_and_eligibility() {
        let text = "\
apiVersion: v1
kind: Node
metadata: {name: node-b, labels: {topology.kubernetes.io/zone: zone-b}}
---
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
spec:
  taints: [{key: ToBeDeletedByClusterAutoscaler, value: '1700000000', effect: NoSchedule}]
";
        let parsed = parse_manifest("nodes.yaml", text);
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        assert_eq!(
            id(&parsed.objects[1]),
            ("Node", String::new(), "node-a".into())
        );
        let mut reconciler = crate::reconcile::Reconciler::on_fake_maps(Some("node-a".into()));
        for object in parsed.objects {
            let origin = Arc::from("nodes.yaml");
            reconciler.apply(Update::Apply { origin, object });
        }
        assert_eq!(reconciler.state().node_zone(), Some("zone-a"));
        assert!(!reconciler.node().eligible());
        let id = crate::model::ObjectRef::new("", "node-a");
        reconciler.apply(Update::Delete {
            kind: Kind::Node,
            id,
        });
        assert_eq!(reconciler.state().node_zone(), None);
    }

    #[test]
    fn errors_name_file_object_and_field() {
        assert_eq!(
            problems(
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: eighty}]}\n"
            ),
            [
                "f.yaml: Service default/s: spec.ports[0].port: invalid type: string \"eighty\", expected i32"
            ]
        );
        assert_eq!(
            problems("apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n"),
            ["f.yaml: Service x/(unnamed): metadata.name: missing"]
        );
        assert_eq!(
            problems("kind: Service\nmetadata: {name: s}\n"),
            ["f.yaml: Service default/s: apiVersion: missing in document 1"]
        );
        let yaml_error = problems("apiVersion: v1\nkind: [unclosed\n");
        assert_eq!(yaml_error.len(), 1);
        assert!(
            yaml_error[0].starts_with("f.yaml: (file): (yaml): "),
            "{yaml_error:?}"
        );
    }

    /// Anchors and merge keys work as kubectl has them (within a document): a Service's
    /// ports shared through an alias, a metadata block merged in with its own fields winning.
    #[test]
    fn anchors_and_merge_keys_are_resolved() {
        let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: &meta {name: a, namespace: shop, labels: {tier: web}}
  spec: {clusterIP: 10.96.0.1, ports: &ports [{name: http, port: 80}]}
- apiVersion: v1
  kind: Service
  metadata:
    <<: *meta
    name: b
  spec: {clusterIP: 10.96.0.2, ports: *ports}
";
        let parsed = parse_manifest("f.yaml", text);
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        let services: Vec<_> = parsed
            .objects
            .iter()
            .filter_map(|o| match o {
                Object::Service(s) => Some(s),
                _ => None,
            })
            .collect();
        let b = services[1];
        assert_eq!(
            (b.metadata.name.as_deref(), b.metadata.namespace.as_deref()),
            (Some("b"), Some("shop"))
        );
        let port = |s: &k8s_openapi::api::core::v1::Service| {
            s.spec.as_ref().and_then(|s| s.ports.clone()).unwrap()[0].port
        };
        assert_eq!((port(services[0]), port(b)), (80, 80));
    }

    /// Hostile YAML is refused as unreadable, at once: an alias bomb (a billion laughs) and
    /// nesting deeper than the parser's limit.
    #[test]
    fn alias_bombs_and_deep_nesting_are_refused() {
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (level, prev) in ["b", "c", "d", "e", "f", "g", "h", "i"]
            .iter()
            .zip("abcdefgh".chars())
        {
            bomb.push_str(&format!(
                "{level}: &{level} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        for text in [bomb, deep] {
            let started = std::time::Instant::now();
            let found = problems(&text);
            assert_eq!(found.len(), 1, "{found:?}");
            assert!(
                found[0].starts_with("f.yaml: (file): (yaml): "),
                "{found:?}"
            );
            assert!(started.elapsed() < std::time::Duration::from_secs(2));
        }
    }

    #[test]
    fn large_generated_files_parse() {
        let one = "---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        let text: String = (0..3000)
            .map(|i| one.replace("name: s", &format!("name: s{i}")))
            .collect();
        let parsed = parse_manifest("big.yaml", &text);
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems.first());
        assert_eq!(parsed.objects.len(), 3000);
    }

    #[test]
    fn directory_refresh_rereads_only_changes() {
        let dir = std::env::temp_dir().join(format!("lb-manifests-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let svc =
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\n";
        fs::write(dir.join("a.yaml"), svc).unwrap();
        fs::write(dir.join("b.yml"), svc).unwrap();
        fs::write(dir.join(".hidden.yaml"), "not: [yaml").unwrap();
        fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let mut manifests = ManifestDir::new(&dir);
        let applied = |updates: &[Update]| -> Vec<String> {
            updates
                .iter()
                .map(|u| match u {
                    Update::Apply { origin, object } => {
                        let (kind, ns, name) = id(object);
                        let file = Path::new(&**origin).file_name().unwrap().to_string_lossy();
                        format!("apply {kind} {ns}/{name} from {file}")
                    }
                    Update::Delete { kind, id } => format!("delete {kind} {id}"),
                    Update::Relisting(_) | Update::Relisted(_) => unreachable!(),
                })
                .collect()
        };
        let updates = manifests.refresh().unwrap().expect("a first read");
        assert_eq!(applied(&updates), ["apply Service default/a from a.yaml"]);
        let problems = manifests.problems();
        assert_eq!(problems.len(), 1, "the duplicate in b.yml: {problems:?}");
        assert!(problems[0].origin.ends_with("b.yml"));
        assert!(manifests.refresh().unwrap().is_none(), "nothing changed");
        // The first definition goes: the one in b.yml takes over.
        fs::remove_file(dir.join("a.yaml")).unwrap();
        let updates = manifests.refresh().unwrap().unwrap();
        assert_eq!(applied(&updates), ["apply Service default/a from b.yml"]);
        assert!(manifests.problems().is_empty());
        // Only the changed file's objects are reported.
        let other =
            "apiVersion: v1\nkind: Service\nmetadata: {name: c}\nspec: {clusterIP: 10.96.0.3}\n";
        fs::write(dir.join("c.yaml"), other).unwrap();
        let updates = manifests.refresh().unwrap().unwrap();
        assert_eq!(applied(&updates), ["apply Service default/c from c.yaml"]);
        fs::remove_file(dir.join("b.yml")).unwrap();
        let updates = manifests.refresh().unwrap().unwrap();
        assert_eq!(applied(&updates), ["delete Service default/a"]);
        // A broken edit keeps the last readable version, and says so.
        fs::write(dir.join("c.yaml"), "kind: Service\nmetadata: {name: [c\n").unwrap();
        let updates = manifests.refresh().unwrap().unwrap();
        assert!(applied(&updates).is_empty(), "c stays as it was");
        let problems = manifests.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .message
                .ends_with("its last readable version stays in effect"),
            "{problems:?}"
        );
        fs::write(dir.join("c.yaml"), "").unwrap();
        let updates = manifests.refresh().unwrap().unwrap();
        assert_eq!(
            applied(&updates),
            ["delete Service default/c"],
            "emptied on purpose"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    fn service(name: &str, ip: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}}}\n"
        )
    }

    fn names(updates: &[Update]) -> Vec<String> {
        updates
            .iter()
            .map(|u| match u {
                Update::Apply { object, .. } => format!("apply {}", id(object).2),
                Update::Delete { id, .. } => format!("delete {}", id.name()),
                Update::Relisting(_) | Update::Relisted(_) => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn only_changed_definitions_are_handed_out() {
        let dir = std::env::temp_dir().join(format!("lb-manifests-docs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("many.yaml");
        let text = |changed: &str| -> String {
            (0..50)
                .map(|i| {
                    let ip = if i == 7 {
                        changed.to_owned()
                    } else {
                        format!("10.96.1.{i}")
                    };
                    service(&format!("s{i}"), &ip)
                })
                .collect()
        };
        fs::write(&file, text("10.96.1.7")).unwrap();
        let mut manifests = ManifestDir::new(&dir);
        assert_eq!(manifests.refresh().unwrap().unwrap().len(), 50);
        // One Service of fifty changes: it alone is handed out.
        fs::write(&file, text("10.96.2.7")).unwrap();
        let updates = manifests.refresh_with_named(std::slice::from_ref(&file));
        assert_eq!(names(&updates), ["apply s7"]);
        // Written in place and read half-way: cut inside a document, the file is not YAML
        // and stays as it was; cut between documents, the missing ones go until the next
        // event (the rest of the write) brings them back.
        let full = text("10.96.3.7");
        let mid_document = full.find("name: s9}").unwrap();
        fs::write(&file, &full[..mid_document]).unwrap();
        assert!(
            manifests
                .refresh_with_named(std::slice::from_ref(&file))
                .is_empty()
        );
        assert_eq!(manifests.problems().len(), 1, "{:?}", manifests.problems());
        let between = full
            .find("---\napiVersion: v1\nkind: Service\nmetadata: {name: s9}")
            .unwrap();
        fs::write(&file, &full[..between]).unwrap();
        let updates = manifests.refresh_with_named(std::slice::from_ref(&file));
        assert_eq!(
            updates.len(),
            42,
            "s7 changed, s9.. gone: {:?}",
            names(&updates)
        );
        assert!(manifests.problems().is_empty());
        fs::write(&file, &full).unwrap();
        let updates = manifests.refresh_with_named(std::slice::from_ref(&file));
        assert_eq!(updates.len(), 41, "{:?}", names(&updates));
        // A named file is read even when its stamp looks the same.
        assert!(
            manifests
                .refresh_with_named(std::slice::from_ref(&file))
                .is_empty()
        );
        // The same objects defined again in another file, one that sorts first: the
        // definitions in effect stay (nothing is handed out), the new file's are reported.
        fs::write(dir.join("a.yaml"), text("10.96.4.7")).unwrap();
        let updates = manifests.refresh().unwrap().unwrap();
        assert!(updates.is_empty(), "{:?}", names(&updates));
        let problems = manifests.problems();
        assert_eq!(problems.len(), 50, "a.yaml's are duplicates");
        assert!(problems.iter().all(|p| p.origin.ends_with("a.yaml")));
        // Once the first definitions go, a.yaml's take effect (s7 differs: its ClusterIP).
        fs::remove_file(&file).unwrap();
        let updates = manifests.refresh().unwrap().unwrap();
        assert_eq!(updates.len(), 50, "{:?}", names(&updates));
        assert!(manifests.problems().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A second definition of an object in effect, in a file that sorts first, never
    /// replaces it: it is reported naming both files, and takes effect only when the first
    /// goes. One defined twice in one file: the first stays, the second is reported.
    #[test]
    fn a_second_definition_never_replaces_the_one_in_effect() {
        let dir = std::env::temp_dir().join(format!("lb-manifests-dup-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("z-web.yaml"), service("web", "10.96.0.10")).unwrap();
        let mut manifests = ManifestDir::new(&dir);
        let updates = manifests.refresh().unwrap().unwrap();
        assert_eq!(names(&updates), ["apply web"]);
        fs::write(dir.join("a-web.yaml"), service("web", "10.96.0.20")).unwrap();
        let updates = manifests.refresh().unwrap().unwrap();
        assert!(updates.is_empty(), "{:?}", names(&updates));
        let problems: Vec<String> = manifests
            .problems()
            .iter()
            .map(ToString::to_string)
            .collect();
        let a = dir.join("a-web.yaml").display().to_string();
        let z = dir.join("z-web.yaml").display().to_string();
        assert_eq!(
            problems,
            [format!(
                "{a}: Service default/web: metadata.name: already defined in {z}; that \
                 definition, seen first, stays in effect and this one is ignored until it is \
                 removed"
            )]
        );
        // Edits of either keep the order: the first file's still counts.
        fs::write(dir.join("z-web.yaml"), service("web", "10.96.0.11")).unwrap();
        fs::write(dir.join("a-web.yaml"), service("web", "10.96.0.21")).unwrap();
        let updates = manifests.refresh().unwrap().unwrap();
        assert_eq!(applied_ips(&updates), ["10.96.0.11"]);
        // The first goes: the second takes effect.
        fs::remove_file(dir.join("z-web.yaml")).unwrap();
        let updates = manifests.refresh().unwrap().unwrap();
        assert_eq!(applied_ips(&updates), ["10.96.0.21"]);
        assert!(manifests.problems().is_empty());
        // Twice in one file.
        let twice = [service("api", "10.96.0.30"), service("api", "10.96.0.31")].concat();
        fs::write(dir.join("m-api.yaml"), twice).unwrap();
        let updates = manifests.refresh().unwrap().unwrap();
        assert_eq!(applied_ips(&updates), ["10.96.0.30"]);
        let problems = manifests.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .message
                .starts_with("defined again later in the same file; the first definition"),
            "{problems:?}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// After a restart (a new reader of the same directory) the definition that was in
    /// effect, in the older file, is still the one seen first: new files are read oldest
    /// first, by birth time where the filesystem records it.
    #[test]
    fn a_restart_keeps_the_older_files_definition() {
        let dir = std::env::temp_dir().join(format!("lb-manifests-born-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("z-web.yaml"), service("web", "10.96.0.10")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(dir.join("a-web.yaml"), service("web", "10.96.0.20")).unwrap();
        let born = |name: &str| fs::metadata(dir.join(name)).and_then(|m| m.created());
        let (Ok(z), Ok(a)) = (born("z-web.yaml"), born("a-web.yaml")) else {
            eprintln!("this filesystem records no birth time: file name order applies");
            fs::remove_dir_all(&dir).unwrap();
            return;
        };
        assert!(z < a, "z-web.yaml was written first");
        let mut restarted = ManifestDir::new(&dir);
        let updates = restarted.refresh().unwrap().unwrap();
        assert_eq!(applied_ips(&updates), ["10.96.0.10"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A file over the size cap is not read: reported with its name, its last readable
    /// version staying in effect.
    #[test]
    fn files_over_the_size_cap_are_reported_and_not_read() {
        let dir = std::env::temp_dir().join(format!("lb-manifests-cap-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("big.yaml");
        fs::write(&file, service("web", "10.96.0.10")).unwrap();
        let mut manifests = ManifestDir::new(&dir).with_max_file_size(1000);
        assert_eq!(names(&manifests.refresh().unwrap().unwrap()), ["apply web"]);
        let big: String = (0..20)
            .map(|i| service(&format!("s{i}"), "10.96.1.1"))
            .collect();
        assert!(big.len() > 1000);
        fs::write(&file, &big).unwrap();
        let updates = manifests.refresh().unwrap().unwrap();
        assert!(updates.is_empty(), "web stays: {:?}", names(&updates));
        let problems: Vec<String> = manifests
            .problems()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            problems,
            [format!(
                "{}: (file): (size): larger than 1000 bytes (--manifest-max-file-size); not \
                 read: split it into smaller files; its last readable version stays in effect",
                file.display()
            )]
        );
        // A new file over the cap: reported, nothing of it applied.
        fs::write(dir.join("new.yaml"), &big).unwrap();
        let updates = manifests.refresh().unwrap().unwrap();
        assert!(updates.is_empty());
        assert_eq!(manifests.problems().len(), 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn applied_ips(updates: &[Update]) -> Vec<String> {
        updates
            .iter()
            .map(|u| match u {
                Update::Apply {
                    object: Object::Service(s),
                    ..
                } => s.spec.as_ref().unwrap().cluster_ip.clone().unwrap(),
                _ => unreachable!(),
            })
            .collect()
    }

    impl ManifestDir {
        fn refresh_with_named(&mut self, paths: &[std::path::PathBuf]) -> Vec<Update> {
            let mut updates = Vec::new();
            self.refresh_with(Some(paths), |u| updates.push(u)).unwrap();
            updates
        }
    }
}
