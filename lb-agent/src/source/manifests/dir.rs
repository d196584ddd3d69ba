//! The directory and what is remembered of it: per file its stamp and, per document, the hash
//! of its text and the identities of its objects — never the objects themselves. A document
//! whose text did not change is not parsed again; an object whose definition did not change
//! is not handed out again. An object defined twice (in two files, or twice in one) keeps the
//! definition seen first in effect until that one goes away, whatever the files are called;
//! every other definition is reported. When the definition in effect goes away and another
//! file defines the object too, that file's document is read again.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use tracing::warn;

use super::{
    Identity, Object, Update, is_manifest,
    parse::{self, ParsedFile},
};
use crate::{model::ObjectRef, translate::Problem};

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

/// The manifests directory and what the last read of each file found in it.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    /// Every object some file defines: its definitions and the one last handed out.
    objects: HashMap<Arc<Identity>, Definitions>,
    /// Objects defined by more than one file (every definition after the first is a problem).
    shared: HashSet<Arc<Identity>>,
    /// Namespaces, each held once however many objects name it.
    namespaces: HashSet<Arc<str>>,
    /// A file larger than this is not read (`--manifest-max-file-size`).
    max_file_size: u64,
}

/// The default of `--manifest-max-file-size`: 16 MiB, 60 times what 1,000 Services with
/// their slices take (and 16 times a ConfigMap's limit).
pub const DEFAULT_MAX_FILE_SIZE: u64 = 16 << 20;

/// What is kept of one file.
#[derive(Debug)]
struct FileEntry {
    stamp: Stamp,
    path: Arc<Path>,
    origin: Arc<str>,
    documents: Vec<DocumentEntry>,
    problems: Vec<Problem>,
}

/// What is kept of one run of documents of a file (see [`parse::split`]; usually one).
#[derive(Debug)]
struct DocumentEntry {
    hash: u64,
    /// How many documents it held (the documents after it are numbered on in problems).
    count: u32,
    /// Whether it had problems: then it is parsed again with its file, as its problems
    /// carry document numbers that may have moved.
    problems: bool,
    objects: Box<[Arc<Identity>]>,
}

/// The files defining one object, and the definition in effect.
#[derive(Debug, Default)]
struct Definitions {
    /// In the order they were seen (the first is in effect), each with the hash of its
    /// definition. A file whose definition changes keeps its place.
    owners: Vec<(Arc<Path>, u64)>,
    /// The definition last handed out, if any.
    applied: Option<(Arc<Path>, u64)>,
}

/// The hash of the `index`th object of a run of documents whose text hashed to `hash`.
fn object_hash(hash: u64, index: usize) -> u64 {
    hash ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Files to read (with their stamp now), and files gone.
type Listing = (Vec<(PathBuf, Stamp)>, Vec<PathBuf>);

/// One file as a worker read it.
struct FileRead {
    path: PathBuf,
    stamp: Stamp,
    outcome: ReadOutcome,
}

enum ReadOutcome {
    /// The file could not be read (it stays as it was).
    Failed,
    /// The file is not YAML.
    Unreadable(Problem),
    Read(Vec<DocumentRead>),
}

enum DocumentRead {
    /// The same text as the last read's document at this index.
    Same(usize),
    Parsed {
        hash: u64,
        count: usize,
        parsed: ParsedFile,
    },
}

/// The objects a refresh may have changed, and those it parsed (until handed out).
#[derive(Default)]
struct Pending {
    affected: Vec<Arc<Identity>>,
    seen: HashSet<Arc<Identity>>,
    fresh: HashMap<(Arc<Identity>, Arc<Path>), Object>,
}

impl Pending {
    fn affect(&mut self, identity: &Arc<Identity>) {
        if self.seen.insert(Arc::clone(identity)) {
            self.affected.push(Arc::clone(identity));
        }
    }
}

/// Files parsed at once: enough to keep the workers busy, few enough that their objects
/// (held until handed out) stay a small part of the agent's memory.
const FILES_PER_BATCH: usize = 8;

impl ManifestDir {
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            objects: HashMap::new(),
            shared: HashSet::new(),
            namespaces: HashSet::new(),
            max_file_size: DEFAULT_MAX_FILE_SIZE,
        }
    }

    /// Files larger than `bytes` are not read: each is reported, and its last readable
    /// version (if any) stays in effect.
    #[must_use]
    pub const fn with_max_file_size(mut self, bytes: u64) -> Self {
        self.max_file_size = bytes;
        self
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the files that changed since the last call (new, modified, removed) and
    /// returns the objects that changed with them, or `None` when no file changed. Only the
    /// changed files are read, only their changed documents parsed, and only the objects
    /// whose definition changed are returned: a one-line edit of one file among thousands
    /// of Services costs that file.
    ///
    /// # Errors
    /// When the directory itself cannot be listed.
    pub fn refresh(&mut self) -> std::io::Result<Option<Vec<Update>>> {
        let mut updates = Vec::new();
        let changed = self.refresh_with(None, |update| updates.push(update))?;
        Ok(changed.then_some(updates))
    }

    /// [`Self::refresh`], handing each change to `apply` as soon as it is known (the objects
    /// of a large directory are never all in memory at once). With `only`, just those files
    /// are looked at, and read even if they look unchanged (a watch event named them);
    /// without, the whole directory is listed and the files whose stamp changed are read.
    /// Returns whether any file changed.
    ///
    /// # Errors
    /// When the directory itself cannot be listed.
    pub fn refresh_with(
        &mut self,
        only: Option<&[PathBuf]>,
        mut apply: impl FnMut(Update),
    ) -> std::io::Result<bool> {
        let (to_read, gone) = match only {
            None => self.scan()?,
            Some(paths) => self.named(paths),
        };
        let changed = !to_read.is_empty() || !gone.is_empty();
        let mut pending = Pending::default();
        for path in gone {
            self.forget(&path, &mut pending);
        }
        self.resolve(&mut pending, &mut apply);
        for batch in to_read.chunks(FILES_PER_BATCH) {
            for read in self.read_files(batch) {
                self.merge(read, &mut pending);
            }
            self.resolve(&mut pending, &mut apply);
        }
        Ok(changed)
    }

    /// The manifest files of the directory whose stamp changed, and the files gone.
    fn scan(&self) -> std::io::Result<Listing> {
        let mut paths: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| is_manifest(path))
            .collect();
        paths.sort();
        let mut seen = HashSet::new();
        let mut to_read = Vec::new();
        let mut born = HashMap::new();
        for path in paths {
            // `metadata` follows symlinks (ConfigMap volumes are symlinks into `..data`).
            let Ok(metadata) = fs::metadata(&path) else {
                continue;
            };
            if !metadata.is_file() {
                continue;
            }
            let stamp = Stamp::of(&metadata);
            if self.files.get(&path).is_none_or(|old| old.stamp != stamp) {
                born.insert(path.clone(), metadata.created().ok());
                to_read.push((path.clone(), stamp));
            }
            seen.insert(path);
        }
        // New files are read oldest first (by birth time where the filesystem records it,
        // then by name), so that after a restart the definition that was in effect is still
        // the one seen first.
        to_read.sort_by(|(a, _), (b, _)| (born[a], a).cmp(&(born[b], b)));
        let gone = self
            .files
            .keys()
            .filter(|path| !seen.contains(*path))
            .cloned()
            .collect();
        Ok((to_read, gone))
    }

    /// The named files: those to read, and those gone.
    fn named(&self, paths: &[PathBuf]) -> Listing {
        let mut paths: Vec<&PathBuf> = paths.iter().filter(|p| is_manifest(p)).collect();
        paths.sort();
        paths.dedup();
        let mut to_read = Vec::new();
        let mut gone = Vec::new();
        for path in paths {
            match fs::metadata(path) {
                Ok(metadata) if metadata.is_file() => {
                    to_read.push((path.clone(), Stamp::of(&metadata)));
                }
                _ if self.files.contains_key(path) => gone.push(path.clone()),
                _ => {}
            }
        }
        (to_read, gone)
    }

    /// Reads and parses `batch` (in parallel when there are cores to spare), in its order.
    fn read_files(&self, batch: &[(PathBuf, Stamp)]) -> Vec<FileRead> {
        let workers = std::thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .min(batch.len());
        if workers <= 1 {
            return batch
                .iter()
                .map(|(path, stamp)| self.read_file(path, *stamp))
                .collect();
        }
        let next = AtomicUsize::new(0);
        let reads: Vec<Mutex<Option<FileRead>>> = batch.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((path, stamp)) = batch.get(i) else {
                            break;
                        };
                        let read = self.read_file(path, *stamp);
                        *reads[i]
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(read);
                    }
                });
            }
        });
        reads
            .into_iter()
            .filter_map(|m| {
                m.into_inner()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            })
            .collect()
    }

    /// Reads one file, parsing only the documents whose text the last read did not have.
    fn read_file(&self, path: &Path, stamp: Stamp) -> FileRead {
        let origin = path.display().to_string();
        let outcome = match read_capped(path, self.max_file_size) {
            Err(ReadError::TooLarge(problem)) => ReadOutcome::Unreadable(problem),
            Err(ReadError::Io(err)) => {
                warn!(file = %origin, error = %err, "cannot read manifest");
                ReadOutcome::Failed
            }
            Ok(text) => {
                let known: HashMap<u64, usize> = self
                    .files
                    .get(path)
                    .map(|old| {
                        old.documents
                            .iter()
                            .enumerate()
                            .filter(|(_, d)| !d.problems)
                            .map(|(i, d)| (d.hash, i))
                            .collect()
                    })
                    .unwrap_or_default();
                let mut documents = Vec::new();
                let mut number = 0;
                let mut unreadable = false;
                for chunk in parse::split(&text) {
                    if let Some(&i) = known.get(&chunk.hash) {
                        number += self.files[path].documents[i].count as usize;
                        documents.push(DocumentRead::Same(i));
                        continue;
                    }
                    let (parsed, count) = parse::parse_documents(&origin, chunk.text, number);
                    unreadable |= parse::is_unreadable(&parsed.problems);
                    number += count;
                    documents.push(DocumentRead::Parsed {
                        hash: chunk.hash,
                        count,
                        parsed,
                    });
                }
                if unreadable {
                    // Parsed whole, for the error's line numbers to be the file's (and in
                    // case splitting it was wrong).
                    let (parsed, count) = parse::parse_documents(&origin, &text, 0);
                    if parse::is_unreadable(&parsed.problems) {
                        let problem = parsed.problems.into_iter().next();
                        ReadOutcome::Unreadable(problem.expect("an unreadable text has a problem"))
                    } else {
                        ReadOutcome::Read(vec![DocumentRead::Parsed {
                            hash: parse::hash(&text),
                            count,
                            parsed,
                        }])
                    }
                } else {
                    ReadOutcome::Read(documents)
                }
            }
        };
        FileRead {
            path: path.to_path_buf(),
            stamp,
            outcome,
        }
    }

    /// Takes a file's new read into the record, noting the objects it may have changed.
    fn merge(&mut self, read: FileRead, pending: &mut Pending) {
        let FileRead {
            path,
            stamp,
            outcome,
        } = read;
        let documents = match outcome {
            ReadOutcome::Failed => return,
            ReadOutcome::Unreadable(mut problem) => {
                // A file that is not YAML at all (half-written, or a typo in an edit) does
                // not take its Services away: the objects of its last readable version stay
                // in effect, and the problem is reported, as `kubectl apply` of a broken
                // file changes nothing.
                if let Some(old) = self.files.get_mut(&path)
                    && old.documents.iter().any(|d| !d.objects.is_empty())
                {
                    problem
                        .message
                        .push_str("; its last readable version stays in effect");
                    old.stamp = stamp;
                    old.problems = vec![problem];
                    return;
                }
                self.forget(&path, pending);
                let entry = self.entry(&path, stamp, Vec::new(), vec![problem]);
                self.files.insert(path, entry);
                return;
            }
            ReadOutcome::Read(documents) => documents,
        };
        let old = self.files.remove(&path);
        let shared_path = old
            .as_ref()
            .map_or_else(|| Arc::from(path.as_path()), |o| Arc::clone(&o.path));
        let mut entries = Vec::with_capacity(documents.len());
        let mut problems = Vec::new();
        for document in documents {
            match document {
                DocumentRead::Same(i) => {
                    let same = &old.as_ref().expect("a known document has a file").documents[i];
                    entries.push(DocumentEntry {
                        hash: same.hash,
                        count: same.count,
                        problems: false,
                        objects: same.objects.clone(),
                    });
                }
                DocumentRead::Parsed {
                    hash,
                    count,
                    parsed,
                } => {
                    let mut objects = Vec::with_capacity(parsed.objects.len());
                    for object in parsed.objects {
                        let identity = self.intern(&object);
                        pending
                            .fresh
                            .entry((Arc::clone(&identity), Arc::clone(&shared_path)))
                            .or_insert(object);
                        objects.push(identity);
                    }
                    entries.push(DocumentEntry {
                        hash,
                        count: u32::try_from(count).unwrap_or(u32::MAX),
                        problems: !parsed.problems.is_empty(),
                        objects: objects.into_boxed_slice(),
                    });
                    problems.extend(parsed.problems);
                }
            }
        }
        // Each object's first definition in this file, and the later ones as problems.
        let mut defined: HashMap<Arc<Identity>, u64> = HashMap::new();
        let mut order: Vec<Arc<Identity>> = Vec::new();
        for document in &entries {
            for (i, identity) in document.objects.iter().enumerate() {
                if defined.contains_key(identity) {
                    problems.push(duplicate(&path, &path, identity));
                } else {
                    defined.insert(Arc::clone(identity), object_hash(document.hash, i));
                    order.push(Arc::clone(identity));
                }
            }
        }
        if let Some(old) = &old {
            for document in &old.documents {
                for identity in &document.objects {
                    if !defined.contains_key(identity) {
                        self.disown(identity, &old.path, pending);
                    }
                }
            }
        }
        for identity in order {
            let hash = defined[&identity];
            let definitions = self.objects.entry(Arc::clone(&identity)).or_default();
            // A file new to the object comes after those that defined it already: a second
            // definition never takes over from the one in effect.
            let at = definitions
                .owners
                .iter()
                .position(|(owner, _)| **owner == *shared_path);
            match at {
                Some(i) if definitions.owners[i].1 == hash => continue,
                Some(i) => definitions.owners[i].1 = hash,
                None => definitions.owners.push((Arc::clone(&shared_path), hash)),
            }
            if definitions.owners.len() > 1 {
                self.shared.insert(Arc::clone(&identity));
            }
            pending.affect(&identity);
        }
        let mut entry = self.entry(&path, stamp, entries, problems);
        entry.path = shared_path;
        self.files.insert(path, entry);
    }

    fn entry(
        &self,
        path: &Path,
        stamp: Stamp,
        documents: Vec<DocumentEntry>,
        problems: Vec<Problem>,
    ) -> FileEntry {
        FileEntry {
            stamp,
            path: Arc::from(path),
            origin: Arc::from(path.display().to_string()),
            documents,
            problems,
        }
    }

    /// The shared identity of `object`.
    fn intern(&mut self, object: &Object) -> Arc<Identity> {
        let (kind, namespace, name) = object.identity();
        let namespace = match self.namespaces.get(namespace) {
            Some(interned) => Arc::clone(interned),
            None => {
                let interned: Arc<str> = Arc::from(namespace);
                self.namespaces.insert(Arc::clone(&interned));
                interned
            }
        };
        let identity = Identity {
            kind,
            namespace,
            name: Box::from(name),
        };
        match self.objects.get_key_value(&identity) {
            Some((interned, _)) => Arc::clone(interned),
            None => Arc::new(identity),
        }
    }

    /// Drops the file at `path`, noting the objects it defined.
    fn forget(&mut self, path: &Path, pending: &mut Pending) {
        let Some(old) = self.files.remove(path) else {
            return;
        };
        for document in &old.documents {
            for identity in &document.objects {
                self.disown(identity, &old.path, pending);
            }
        }
    }

    /// `path` no longer defines `identity`.
    fn disown(&mut self, identity: &Arc<Identity>, path: &Arc<Path>, pending: &mut Pending) {
        let Some(definitions) = self.objects.get_mut(identity) else {
            return;
        };
        let before = definitions.owners.len();
        definitions.owners.retain(|(owner, _)| owner != path);
        if definitions.owners.len() != before {
            if definitions.owners.len() < 2 {
                self.shared.remove(identity);
            }
            pending.affect(identity);
        }
    }

    /// Hands out each affected object whose definition in effect changed: its new
    /// definition, or its deletion.
    fn resolve(&mut self, pending: &mut Pending, apply: &mut impl FnMut(Update)) {
        let mut reread: BTreeMap<Arc<Path>, Vec<(Arc<Identity>, u64)>> = BTreeMap::new();
        for identity in std::mem::take(&mut pending.affected) {
            let Some(definitions) = self.objects.get_mut(&identity) else {
                continue;
            };
            let Some((path, hash)) = definitions.owners.first().cloned() else {
                if definitions.applied.is_some() {
                    apply(Update::Delete {
                        kind: identity.kind,
                        id: identity.object_ref(),
                    });
                }
                self.objects.remove(&identity);
                continue;
            };
            if definitions.applied.as_ref() == Some(&(Arc::clone(&path), hash)) {
                continue;
            }
            match pending
                .fresh
                .remove(&(Arc::clone(&identity), Arc::clone(&path)))
            {
                Some(object) => {
                    definitions.applied = Some((Arc::clone(&path), hash));
                    let origin = Arc::clone(&self.files[&*path].origin);
                    apply(Update::Apply { origin, object });
                }
                None => reread.entry(path).or_default().push((identity, hash)),
            }
        }
        pending.seen.clear();
        pending.fresh.clear();
        // Definitions that took over from one that went: read again from their files.
        for (path, wanted) in reread {
            let mut found = self.reread(&path, &wanted);
            for (identity, hash) in wanted {
                match found.remove(&identity) {
                    Some(object) => {
                        if let Some(definitions) = self.objects.get_mut(&identity) {
                            definitions.applied = Some((Arc::clone(&path), hash));
                        }
                        let origin = Arc::clone(&self.files[&*path].origin);
                        apply(Update::Apply { origin, object });
                    }
                    None => warn!(
                        file = %path.display(),
                        object = %identity,
                        "the file changed before its definition could be read again; \
                         it is read on the next change or rescan"
                    ),
                }
            }
        }
    }

    /// The objects `wanted` (with the hash of their definition) as `path` defines them now.
    fn reread(
        &mut self,
        path: &Path,
        wanted: &[(Arc<Identity>, u64)],
    ) -> HashMap<Arc<Identity>, Object> {
        let mut found = HashMap::new();
        let Ok(text) = read_capped(path, self.max_file_size) else {
            return found;
        };
        let origin = path.display().to_string();
        for chunk in parse::split(&text) {
            let wants = |i: usize, identity: &Arc<Identity>| {
                wanted
                    .iter()
                    .any(|(w, hash)| w == identity && *hash == object_hash(chunk.hash, i))
            };
            let Some(document) = self.files[path]
                .documents
                .iter()
                .find(|d| d.hash == chunk.hash)
            else {
                continue;
            };
            if !document
                .objects
                .iter()
                .enumerate()
                .any(|(i, id)| wants(i, id))
            {
                continue;
            }
            let identities = document.objects.clone();
            let (parsed, _) = parse::parse_documents(&origin, chunk.text, 0);
            for (i, object) in parsed.objects.into_iter().enumerate() {
                if identities.get(i).is_some_and(|id| wants(i, id)) {
                    found.entry(Arc::clone(&identities[i])).or_insert(object);
                }
            }
        }
        found
    }

    /// The problems of every file: what did not parse or validate as an object, and every
    /// definition of an object after the one in effect (the first seen).
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self
            .files
            .values()
            .flat_map(|f| f.problems.iter().cloned())
            .collect();
        // Defined in several files: every file after the first.
        for identity in &self.shared {
            if let Some(definitions) = self.objects.get(identity)
                && let Some((first, _)) = definitions.owners.first()
            {
                for (path, _) in definitions.owners.iter().skip(1) {
                    problems.push(duplicate(path, first, identity));
                }
            }
        }
        problems.sort_by(|a, b| (&a.origin, &a.object).cmp(&(&b.origin, &b.object)));
        problems
    }
}

/// Why a file was not read.
enum ReadError {
    Io(std::io::Error),
    /// Larger than `--manifest-max-file-size`.
    TooLarge(Problem),
}

/// The text of the file at `path`, when it holds at most `max` bytes (read through a
/// bounded reader: a file that grows while it is read is refused too, never read whole).
fn read_capped(path: &Path, max: u64) -> Result<String, ReadError> {
    use std::io::Read;
    let file = fs::File::open(path).map_err(ReadError::Io)?;
    let mut text = String::new();
    file.take(max.saturating_add(1))
        .read_to_string(&mut text)
        .map_err(ReadError::Io)?;
    if text.len() as u64 > max {
        return Err(ReadError::TooLarge(Problem {
            origin: path.display().to_string(),
            object: "(file)".to_string(),
            field: "(size)".to_string(),
            message: format!(
                "larger than {max} bytes (--manifest-max-file-size); not read: split it into \
                 smaller files"
            ),
        }));
    }
    Ok(text)
}

/// The definition of `identity` in `path` is ignored: `first` defined it before, and its
/// definition stays in effect until it goes away.
fn duplicate(path: &Path, first: &Path, identity: &Identity) -> Problem {
    let message = if path == first {
        "defined again later in the same file; the first definition stays in effect and this \
         one is ignored"
            .to_string()
    } else {
        format!(
            "already defined in {}; that definition, seen first, stays in effect and this one \
             is ignored until it is removed",
            first.display()
        )
    };
    Problem {
        origin: path.display().to_string(),
        object: identity.to_string(),
        field: "metadata.name".to_string(),
        message,
    }
}

impl Identity {
    fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind.name(), self.namespace, self.name)
    }
}
