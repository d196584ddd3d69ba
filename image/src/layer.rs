//! The root filesystem as one tar layer (owned by root, fixed times, sorted, so the same
//! inputs give the same bytes), or written out to a directory (the Dockerfile copies that).
use std::fs;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::Path;

use anyhow::{Context as _, Result};
use tar::{EntryType, Header};

use crate::rootfs::{Entry, Rootfs};

/// The layer's tar bytes; every entry has mtime `mtime` (seconds since the epoch).
pub fn tar(rootfs: &Rootfs, mtime: u64) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, entry) in &rootfs.entries {
        let mut header = Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(mtime);
        match entry {
            Entry::Dir { mode } => {
                header.set_entry_type(EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                builder.append_data(&mut header, format!("{path}/"), std::io::empty())?;
            }
            Entry::File { source, mode } => {
                let bytes =
                    fs::read(source).with_context(|| format!("reading {}", source.display()))?;
                append_file(&mut builder, &mut header, path, &bytes, *mode)?;
            }
            Entry::Text { text, mode } => {
                append_file(&mut builder, &mut header, path, text.as_bytes(), *mode)?;
            }
            Entry::Symlink { target } => {
                header.set_entry_type(EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, path, target)?;
            }
        }
    }
    Ok(builder.into_inner()?)
}

fn append_file(
    builder: &mut tar::Builder<Vec<u8>>,
    header: &mut Header,
    path: &str,
    bytes: &[u8],
    mode: u32,
) -> Result<()> {
    header.set_entry_type(EntryType::Regular);
    header.set_mode(mode);
    header.set_size(bytes.len() as u64);
    builder.append_data(header, path, bytes)?;
    Ok(())
}

/// gzip of `bytes` (the layer as registries store it).
pub fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

/// Writes the root filesystem below `dir` (created; must not hold these paths yet).
pub fn write_dir(rootfs: &Rootfs, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    for (path, entry) in &rootfs.entries {
        let dest = dir.join(path);
        let context = || format!("writing {}", dest.display());
        match entry {
            Entry::Dir { mode } => {
                fs::create_dir_all(&dest).with_context(context)?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(*mode))
                    .with_context(context)?;
            }
            Entry::File { source, mode } => {
                fs::copy(source, &dest).with_context(context)?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(*mode))
                    .with_context(context)?;
            }
            Entry::Text { text, mode } => {
                fs::write(&dest, text).with_context(context)?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(*mode))
                    .with_context(context)?;
            }
            Entry::Symlink { target } => symlink(target, &dest).with_context(context)?,
        }
    }
    Ok(())
}
