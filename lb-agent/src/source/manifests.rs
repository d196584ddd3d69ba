//! The embedded source: a directory of Kubernetes YAML (`*.yaml`, `*.yml`, multi-document,
//! `v1` `List`s) holding Services, EndpointSlices, Pods and Nodes (the one named like
//! `--node-name` is this node's), watched for changes.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::serde::de::DeserializeOwned;
use notify_debouncer_full::{
    DebounceEventResult, Debouncer, RecommendedCache, new_debouncer,
    notify::{RecommendedWatcher, RecursiveMode},
};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, warn};

pub use super::change::Object;
use super::change::{Change, Kind};
use crate::{model::ObjectRef, translate::Problem};

/// Kind, namespace and name: what makes two objects the same object.
type Identity = (Kind, String, String);

impl Object {
    fn identity(&self) -> Identity {
        let meta = match self {
            Self::Service(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::Node(o) => &o.metadata,
        };
        let kind = self.kind();
        let namespace = match self {
            // Cluster-scoped.
            Self::Node(_) => String::new(),
            _ => meta.namespace.clone().unwrap_or_else(|| "default".into()),
        };
        (kind, namespace, meta.name.clone().unwrap_or_default())
    }
}

/// What one file holds: the objects that parsed, and the problems of those that did not.
#[derive(Clone, Debug, Default)]
pub struct ParsedFile {
    pub objects: Vec<Object>,
    pub problems: Vec<Problem>,
}

/// The field a problem names when a file is not YAML at all.
const UNREADABLE_FIELD: &str = "(yaml)";

/// The YAML parser's limits. Its defaults guard against hostile input with small caps (1,024
/// documents, 250k nodes per file) that a generated manifest of a few thousand Services
/// exceeds; these admit files of up to about a million objects, still bounded.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 1_000_000,
            max_nodes: 100_000_000,
            max_events: 200_000_000,
        },
    }
}

/// Parses the text of one manifest file; `origin` names it in problems.
#[must_use]
pub fn parse_manifest(origin: &str, text: &str) -> ParsedFile {
    let mut parsed = ParsedFile::default();
    let documents: Vec<Value> = match serde_saphyr::from_multiple_with_options(text, yaml_options())
    {
        Ok(documents) => documents,
        Err(err) => {
            parsed.problems.push(Problem {
                origin: origin.to_string(),
                object: "(file)".to_string(),
                field: UNREADABLE_FIELD.to_string(),
                message: first_line(&err.to_string()),
            });
            return parsed;
        }
    };
    for (index, document) in documents.into_iter().enumerate() {
        parse_document(origin, index, document, &mut parsed);
    }
    parsed
}

fn parse_document(origin: &str, index: usize, document: Value, parsed: &mut ParsedFile) {
    if document.is_null() {
        return;
    }
    let text = |key: &str| {
        document
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    let name = document
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)");
    let namespace = document
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let object = format!(
        "{} {namespace}/{name}",
        if kind.is_empty() { "document" } else { &kind }
    );
    let problem = |field: String, message: String| Problem {
        origin: origin.to_string(),
        object: object.clone(),
        field,
        message,
    };
    if api_version.is_empty() || kind.is_empty() {
        let field = if api_version.is_empty() {
            "apiVersion"
        } else {
            "kind"
        };
        parsed.problems.push(problem(
            field.into(),
            format!("missing in document {}", index + 1),
        ));
        return;
    }
    if document
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .is_none()
        && kind != "List"
    {
        parsed
            .problems
            .push(problem("metadata.name".into(), "missing".into()));
        return;
    }
    let result = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => typed(document).map(|o| Object::Service(Box::new(o))),
        ("v1", "Pod") => typed(document).map(|o| Object::Pod(Box::new(o))),
        ("v1", "Node") => typed(document).map(|o| Object::Node(Box::new(o))),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            typed(document).map(|o| Object::EndpointSlice(Box::new(o)))
        }
        ("v1", "List") => {
            let items = match document {
                Value::Object(mut map) => map.remove("items"),
                _ => None,
            };
            for item in items
                .and_then(|v| match v {
                    Value::Array(items) => Some(items),
                    _ => None,
                })
                .into_iter()
                .flatten()
            {
                parse_document(origin, index, item, parsed);
            }
            return;
        }
        _ => {
            debug!(origin, %object, api_version, "skipping a kind the load balancer does not use");
            return;
        }
    };
    match result {
        Ok(object) => parsed.objects.push(object),
        Err((field, message)) => parsed.problems.push(problem(field, message)),
    }
}

/// Deserializes into a k8s-openapi type; on failure returns the path of the field.
fn typed<T: DeserializeOwned>(document: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(document).map_err(|err| {
        let path = err.path().to_string();
        (path, first_line(&err.into_inner().to_string()))
    })
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

/// Identity of a file's contents on disk: a change in any of these means a re-read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(metadata: &fs::Metadata) -> Self {
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            len: metadata.len(),
            mtime_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
        }
    }
}

/// The manifests directory and the last parse of each file in it.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    /// The files defining each object, in name order (the first one's definition counts).
    owners: HashMap<Identity, BTreeSet<PathBuf>>,
}

/// One file's stamp and parse, with its objects by identity.
#[derive(Debug)]
struct FileEntry {
    stamp: Stamp,
    parsed: ParsedFile,
    index: HashMap<Identity, usize>,
}

impl FileEntry {
    fn new(stamp: Stamp, parsed: ParsedFile) -> Self {
        let mut index = HashMap::new();
        for (i, object) in parsed.objects.iter().enumerate() {
            // A file defining an object twice: its first definition counts.
            index.entry(object.identity()).or_insert(i);
        }
        Self {
            stamp,
            parsed,
            index,
        }
    }
}

impl ManifestDir {
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            owners: HashMap::new(),
        }
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the files that changed since the last call (new, modified, removed) and
    /// returns the objects that changed with them, or `None` when no file changed. Only the
    /// changed files are parsed, and only their objects compared: a one-line edit of one
    /// file among thousands of Services costs that file.
    ///
    /// # Errors
    /// When the directory itself cannot be listed.
    pub fn refresh(&mut self) -> std::io::Result<Option<Vec<Change>>> {
        let mut seen = HashSet::new();
        let mut affected: BTreeSet<Identity> = BTreeSet::new();
        let mut changed = false;
        let mut paths: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| is_manifest(path))
            .collect();
        paths.sort();
        for path in paths {
            // `metadata` follows symlinks (ConfigMap volumes are symlinks into `..data`).
            let Ok(metadata) = fs::metadata(&path) else {
                continue;
            };
            if !metadata.is_file() {
                continue;
            }
            let stamp = Stamp::of(&metadata);
            seen.insert(path.clone());
            if self.files.get(&path).is_some_and(|old| old.stamp == stamp) {
                continue;
            }
            let origin = path.display().to_string();
            let parsed = match fs::read_to_string(&path) {
                Ok(text) => parse_manifest(&origin, &text),
                Err(err) => {
                    warn!(file = %origin, error = %err, "cannot read manifest");
                    continue;
                }
            };
            let parsed = self.unless_unreadable(&path, parsed);
            self.forget(&path, &mut affected);
            self.remember(path, FileEntry::new(stamp, parsed), &mut affected);
            changed = true;
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|path| !seen.contains(*path))
            .cloned()
            .collect();
        for path in gone {
            self.forget(&path, &mut affected);
            changed = true;
        }
        Ok(changed.then(|| self.updates(affected)))
    }

    /// A file that is not YAML at all (half-written, or a typo in an edit) does not take
    /// its Services away: the objects of its last readable version stay in effect, and the
    /// problem is reported, as `kubectl apply` of a broken file changes nothing.
    fn unless_unreadable(&self, path: &Path, parsed: ParsedFile) -> ParsedFile {
        let unreadable = parsed.objects.is_empty()
            && parsed.problems.iter().any(|p| p.field == UNREADABLE_FIELD);
        match self.files.get(path) {
            Some(last) if unreadable && !last.parsed.objects.is_empty() => ParsedFile {
                objects: last.parsed.objects.clone(),
                problems: parsed
                    .problems
                    .into_iter()
                    .map(|mut p| {
                        p.message
                            .push_str("; its last readable version stays in effect");
                        p
                    })
                    .collect(),
            },
            _ => parsed,
        }
    }

    /// Drops the file at `path`, noting the objects it defined.
    fn forget(&mut self, path: &Path, affected: &mut BTreeSet<Identity>) {
        let Some(old) = self.files.remove(path) else {
            return;
        };
        for identity in old.index.into_keys() {
            if let Some(owners) = self.owners.get_mut(&identity) {
                owners.remove(path);
                if owners.is_empty() {
                    self.owners.remove(&identity);
                }
            }
            affected.insert(identity);
        }
    }

    /// Adds the file at `path`, noting the objects it defines.
    fn remember(&mut self, path: PathBuf, entry: FileEntry, affected: &mut BTreeSet<Identity>) {
        for identity in entry.index.keys() {
            self.owners
                .entry(identity.clone())
                .or_default()
                .insert(path.clone());
            affected.insert(identity.clone());
        }
        self.files.insert(path, entry);
    }

    /// Each affected object as it is now: its first definition, or gone.
    fn updates(&self, affected: BTreeSet<Identity>) -> Vec<Change> {
        affected
            .into_iter()
            .map(|identity| {
                let definition = self.owners.get(&identity).and_then(|owners| {
                    let path = owners.first()?;
                    let file = self.files.get(path)?;
                    let object = file.parsed.objects.get(*file.index.get(&identity)?)?;
                    Some((path, object))
                });
                match definition {
                    Some((path, object)) => Change::Apply {
                        origin: Arc::from(path.display().to_string()),
                        object: object.clone(),
                    },
                    None => Change::Delete {
                        kind: identity.0,
                        id: ObjectRef::new(&identity.1, &identity.2),
                    },
                }
            })
            .collect()
    }

    /// The problems of every file: what did not parse or validate as an object, and every
    /// definition of an object after its first (in file name order).
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self
            .files
            .values()
            .flat_map(|f| f.parsed.problems.iter().cloned())
            .collect();
        let duplicate = |path: &Path, (kind, namespace, name): &Identity| Problem {
            origin: path.display().to_string(),
            object: format!("{kind} {namespace}/{name}"),
            field: "metadata.name".to_string(),
            message: "defined more than once; the first definition is used".to_string(),
        };
        // Defined twice in one file (rare: only such files are scanned).
        for (path, file) in &self.files {
            if file.index.len() != file.parsed.objects.len() {
                for (i, object) in file.parsed.objects.iter().enumerate() {
                    let identity = object.identity();
                    if file.index.get(&identity) != Some(&i) {
                        problems.push(duplicate(path, &identity));
                    }
                }
            }
        }
        // Defined in several files: every file after the first.
        for (identity, owners) in &self.owners {
            for path in owners.iter().skip(1) {
                problems.push(duplicate(path, identity));
            }
        }
        problems.sort_by(|a, b| (&a.origin, &a.object).cmp(&(&b.origin, &b.object)));
        problems
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

/// A watcher on the directory; each burst of changes (debounced) sends one `()`.
pub type DirWatcher = Debouncer<RecommendedWatcher, RecommendedCache>;

/// Starts watching `dir`. Keep the returned watcher alive for as long as events are wanted.
///
/// # Errors
/// When the platform watcher cannot be set up on `dir`.
pub fn watch(
    dir: &Path,
    debounce: Duration,
) -> notify_debouncer_full::notify::Result<(DirWatcher, mpsc::UnboundedReceiver<()>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut debouncer = new_debouncer(debounce, None, move |result: DebounceEventResult| {
        match result {
            Ok(events) if events.is_empty() => {}
            Ok(_) => {
                let _ = tx.send(());
            }
            Err(errors) => {
                for error in errors {
                    warn!(%error, "manifest watcher error");
                }
                // Re-read anyway: a rescan is cheap and corrects whatever was missed.
                let _ = tx.send(());
            }
        }
    })?;
    debouncer.watch(dir, RecursiveMode::NonRecursive)?;
    Ok((debouncer, rx))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let kinds: Vec<_> = parsed.objects.iter().map(|o| o.identity()).collect();
        assert_eq!(
            kinds,
            [
                (Kind::Service, "default".into(), "a".into()),
                (Kind::Pod, "ns".into(), "p".into()),
                (Kind::EndpointSlice, "default".into(), "a-1".into()),
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
            parsed.objects[1].identity(),
            (Kind::Node, String::new(), "node-a".into())
        );
        let mut reconciler = crate::reconcile::Reconciler::on_fake_maps(Some("node-a".into()));
        for object in parsed.objects {
            let origin = Arc::from("nodes.yaml");
            reconciler.apply(Change::Apply { origin, object });
        }
        assert_eq!(reconciler.state().node_zone(), Some("zone-a"));
        assert!(!reconciler.node().eligible());
        let id = ObjectRef::new("", "node-a");
        reconciler.apply(Change::Delete {
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
        let applied = |updates: &[Change]| -> Vec<String> {
            updates
                .iter()
                .map(|u| match u {
                    Change::Apply { origin, object } => {
                        let (kind, ns, name) = object.identity();
                        let file = Path::new(&**origin).file_name().unwrap().to_string_lossy();
                        format!("apply {kind} {ns}/{name} from {file}")
                    }
                    Change::Delete { kind, id } => format!("delete {kind} {id}"),
                    Change::Relisting(_) | Change::Relisted(_) => unreachable!(),
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
        assert_eq!(applied(&updates), ["apply Service default/c from c.yaml"]);
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
}
