//! Following the directory: every change is reported as it happens, naming its file, with
//! no debounce. The reader coalesces what arrives while it is busy ([`Changes::next`]), so
//! one change is handled at once and a burst costs one read per file.
use std::path::{Path, PathBuf};

use notify::{
    Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, ModifyKind},
};
use tokio::sync::mpsc;
use tracing::warn;

use super::is_manifest;

/// Keep it alive for as long as changes are wanted.
pub type DirWatcher = RecommendedWatcher;

/// What changed in the directory since the last look.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Changed {
    /// Nothing that matters (the agent's own reads, hidden files).
    #[default]
    Nothing,
    /// These manifest files (written, created, renamed over, removed).
    Files(Vec<PathBuf>),
    /// Something a file-by-file read would miss: the directory's symlinks swapped (a
    /// ConfigMap volume updates its `..data`), events lost, a watcher error.
    Everything,
}

impl Changed {
    fn add(&mut self, other: Self) {
        *self = match (std::mem::take(self), other) {
            (Self::Everything, _) | (_, Self::Everything) => Self::Everything,
            (Self::Nothing, other) | (other, Self::Nothing) => other,
            (Self::Files(mut files), Self::Files(more)) => {
                files.extend(more);
                Self::Files(files)
            }
        };
    }

    /// What one watch event means.
    fn of(event: &Event) -> Self {
        match event.kind {
            // Opening and reading files (the agent's own reads among them) change nothing;
            // a write is over when its file is closed.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return Self::Nothing,
            // A write in place (truncate, then write): read when its writer closes the
            // file, not half-way (an empty file read then would take its Services away
            // until the write ends). A writer that keeps the file open is seen by the
            // periodic rescan.
            EventKind::Modify(ModifyKind::Data(_)) => return Self::Nothing,
            _ => {}
        }
        if event.need_rescan() || event.paths.is_empty() {
            return Self::Everything;
        }
        let mut changed = Self::Nothing;
        for path in &event.paths {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if is_manifest(path) {
                changed.add(Self::Files(vec![path.clone()]));
            } else if name.starts_with("..") || name.is_empty() {
                // Kubernetes' atomic writer swaps `..data`; the directory itself moved.
                changed.add(Self::Everything);
            }
            // Anything else (hidden staging files, other extensions) is no manifest.
        }
        changed
    }
}

/// The receiving end of a watch.
#[derive(Debug)]
pub struct Changes(mpsc::UnboundedReceiver<Changed>);

impl Changes {
    /// Waits for a change, then takes every other change queued with it or arriving within
    /// [`SETTLE`] of the last (at most [`MAX_SETTLE`] in all): the steps of one edit (a
    /// file written, another removed) are handled as one change, and what arrives while
    /// the last change was handled is handled in one go. `None` when the watch ended.
    pub async fn next(&mut self) -> Option<Changed> {
        loop {
            let mut changed = self.0.recv().await?;
            let deadline = tokio::time::Instant::now() + MAX_SETTLE;
            loop {
                while let Ok(more) = self.0.try_recv() {
                    changed.add(more);
                }
                let until = (tokio::time::Instant::now() + SETTLE).min(deadline);
                match tokio::time::timeout_at(until, self.0.recv()).await {
                    Ok(Some(more)) => changed.add(more),
                    Ok(None) | Err(_) => break,
                }
            }
            if changed != Changed::Nothing {
                return Some(changed);
            }
        }
    }
}

/// How long a change waits for the next step of the same edit: far below the 5 ms an
/// endpoint change may take to reach the maps, far above the microseconds between the
/// steps of one edit.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(1);
/// The longest a change waits for the edit it belongs to, however busy the directory.
const MAX_SETTLE: std::time::Duration = std::time::Duration::from_millis(3);

/// Starts watching `dir`. Keep the returned watcher alive for as long as changes are wanted.
///
/// # Errors
/// When the platform watcher cannot be set up on `dir`.
pub fn watch(dir: &Path) -> notify::Result<(DirWatcher, Changes)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        let changed = match event {
            Ok(event) => Changed::of(&event),
            Err(error) => {
                warn!(%error, "manifest watcher error");
                // Read everything again: unchanged files cost a stat, and it corrects
                // whatever was missed.
                Changed::Everything
            }
        };
        if changed != Changed::Nothing {
            let _ = tx.send(changed);
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok((watcher, Changes(rx)))
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, RenameMode};

    use super::*;

    fn event(kind: EventKind, paths: &[&str]) -> Event {
        paths
            .iter()
            .fold(Event::new(kind), |e, p| e.add_path(PathBuf::from(p)))
    }

    #[test]
    fn events_name_files_or_ask_for_a_rescan() {
        let write = EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any));
        assert_eq!(
            Changed::of(&event(write, &["/m/a.yaml"])),
            Changed::Nothing,
            "written in place: read when closed"
        );
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert_eq!(
            Changed::of(&event(rename, &["/m/.a.yaml.tmp", "/m/a.yaml"])),
            Changed::Files(vec!["/m/a.yaml".into()]),
            "a hidden staging file renamed over a manifest: that manifest"
        );
        let open = EventKind::Access(AccessKind::Open(notify::event::AccessMode::Any));
        assert_eq!(Changed::of(&event(open, &["/m/a.yaml"])), Changed::Nothing);
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(
            Changed::of(&event(closed, &["/m/a.yaml"])),
            Changed::Files(vec!["/m/a.yaml".into()])
        );
        let create = EventKind::Create(CreateKind::Any);
        assert_eq!(
            Changed::of(&event(create, &["/m/..data"])),
            Changed::Everything
        );
        assert_eq!(
            Changed::of(&event(create, &["/m/notes.txt"])),
            Changed::Nothing
        );
        assert_eq!(
            Changed::of(&event(EventKind::Other, &[])),
            Changed::Everything
        );
    }

    #[tokio::test]
    async fn a_burst_is_taken_in_one_go() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut changes = Changes(rx);
        tx.send(Changed::Files(vec!["a.yaml".into()])).unwrap();
        tx.send(Changed::Files(vec!["b.yaml".into()])).unwrap();
        assert_eq!(
            changes.next().await,
            Some(Changed::Files(vec!["a.yaml".into(), "b.yaml".into()]))
        );
        tx.send(Changed::Files(vec!["a.yaml".into()])).unwrap();
        tx.send(Changed::Everything).unwrap();
        assert_eq!(changes.next().await, Some(Changed::Everything));
    }
}
