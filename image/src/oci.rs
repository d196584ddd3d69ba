//! An OCI image layout (image-spec 1.0: `oci-layout`, `index.json`, `blobs/sha256/…`) in one
//! tar file: what `podman load`, `skopeo copy oci-archive:…` and `buildah` read.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::rootfs::PATH_ENV;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The image's settings besides its one layer.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// RFC 3339 (`created`, and `org.opencontainers.image.created`).
    pub created: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub user: String,
    pub labels: BTreeMap<String, String>,
    /// `org.opencontainers.image.ref.name` in `index.json`: the image's name with its tag.
    pub ref_name: String,
}

/// The layer as stored: its bytes, media type, and the digest of its uncompressed tar.
pub struct Layer {
    pub blob: Vec<u8>,
    pub media_type: &'static str,
    pub diff_id: String,
}

impl Layer {
    /// A layer of `tar` bytes, gzipped when `compress`.
    pub fn new(tar: &[u8], compress: bool) -> Result<Self> {
        let diff_id = digest(tar);
        let (blob, media_type) = if compress {
            (crate::layer::gzip(tar)?, LAYER_GZIP)
        } else {
            (tar.to_vec(), LAYER_TAR)
        };
        Ok(Self {
            blob,
            media_type,
            diff_id,
        })
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// `sha256:…` of the manifest: the image's digest in a registry.
    pub manifest_digest: String,
    /// Bytes of the layer as stored (what a pull transfers, with the small config).
    pub layer_size: u64,
    /// Bytes of the archive file.
    pub archive_size: u64,
}

/// Writes the OCI archive `out` holding one image of `layer` with `config`.
pub fn write_archive(out: &Path, config: &ImageConfig, layer: &Layer) -> Result<Written> {
    let config_json = serde_json::to_vec(&json!({
        "created": config.created,
        "architecture": architecture(),
        "os": "linux",
        "config": {
            "User": config.user,
            "Env": [format!("PATH={PATH_ENV}")],
            "Entrypoint": config.entrypoint,
            "Cmd": config.cmd,
            "Labels": config.labels,
        },
        "rootfs": { "type": "layers", "diff_ids": [layer.diff_id] },
        "history": [{ "created": config.created, "created_by": "cargo xtask image" }],
    }))?;
    let manifest_json = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": descriptor(CONFIG_TYPE, &config_json),
        "layers": [descriptor(layer.media_type, &layer.blob)],
        "annotations": config.labels,
    }))?;
    let mut manifest_descriptor = descriptor(MANIFEST_TYPE, &manifest_json);
    manifest_descriptor["annotations"] =
        json!({ "org.opencontainers.image.ref.name": config.ref_name });
    let index_json = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_descriptor],
    }))?;

    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut archive = tar::Builder::new(BufWriter::new(file));
    let created = 0;
    append(
        &mut archive,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        created,
    )?;
    append(&mut archive, "index.json", &index_json, created)?;
    for blob in [&config_json, &manifest_json, &layer.blob] {
        let name = format!("blobs/sha256/{}", hex_digest(blob));
        append(&mut archive, &name, blob, created)?;
    }
    archive
        .into_inner()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    Ok(Written {
        manifest_digest: digest(&manifest_json),
        layer_size: layer.blob.len() as u64,
        archive_size: std::fs::metadata(out)?.len(),
    })
}

fn append<W: std::io::Write>(
    archive: &mut tar::Builder<W>,
    path: &str,
    bytes: &[u8],
    mtime: u64,
) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_mtime(mtime);
    header.set_size(bytes.len() as u64);
    archive
        .append_data(&mut header, path, bytes)
        .with_context(|| format!("adding {path} to the archive"))
}

fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({ "mediaType": media_type, "digest": digest(bytes), "size": bytes.len() })
}

fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// `sha256:<hex>`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex_digest(bytes))
}

/// The OCI name of this machine's architecture (the image holds this machine's binaries).
fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_sha256_hex() {
        assert_eq!(
            digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
