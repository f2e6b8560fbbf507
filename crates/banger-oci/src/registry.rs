//! Pulling an image from a registry into an OCI image layout, which is
//! then read like any other (`source::open`): one path for every way an
//! image arrives, and every digest checked again when it is read.
//!
//! Anonymous unless the user's Docker configuration has credentials for
//! the registry (`auths` in `$DOCKER_CONFIG/config.json` or
//! `~/.docker/config.json`). Plain HTTP only for a registry on the loopback
//! address (as Docker does) or named in `BANGER_INSECURE_REGISTRIES`.

use crate::source::{index_choice, sha256_hex};
use crate::{Error, Result};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use std::path::Path;

const ACCEPTED: [&str; 4] = [
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// A registry reference (`python:3.12`, `docker.io/library/python:3.12`,
/// `ghcr.io/o/r@sha256:...`), normalised.
pub fn parse(reference: &str) -> Result<Reference> {
    reference
        .parse::<Reference>()
        .map_err(|e| Error::Invalid(format!("{reference:?} is not an image reference: {e}")))
}

fn registry_error(reference: &Reference, e: impl std::fmt::Display) -> Error {
    Error::Registry(format!("{}: {e}", reference.whole()))
}

fn protocol(registry: &str) -> ClientProtocol {
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    let insecure: Vec<String> = std::env::var("BANGER_INSECURE_REGISTRIES")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if matches!(host, "localhost" | "127.0.0.1" | "[::1]") || insecure.iter().any(|r| r == registry) {
        ClientProtocol::Http
    } else {
        ClientProtocol::Https
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: String,
}

/// Credentials from the user's Docker configuration, if any.
fn credentials(registry: &str) -> RegistryAuth {
    use base64::Engine;
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker")));
    let Some(text) = dir.and_then(|d| std::fs::read(d.join("config.json")).ok()) else {
        return RegistryAuth::Anonymous;
    };
    let Ok(config) = serde_json::from_slice::<DockerConfig>(&text) else {
        return RegistryAuth::Anonymous;
    };
    let docker_hub = matches!(registry, "docker.io" | "index.docker.io" | "registry-1.docker.io");
    let entry = config.auths.iter().find(|(k, _)| {
        let k = k.trim_start_matches("https://").trim_start_matches("http://");
        let host = k.split('/').next().unwrap_or(k);
        host == registry || (docker_hub && host == "index.docker.io")
    });
    let Some((_, a)) = entry else {
        return RegistryAuth::Anonymous;
    };
    let Ok(plain) = base64::engine::general_purpose::STANDARD.decode(a.auth.trim()) else {
        return RegistryAuth::Anonymous;
    };
    match String::from_utf8_lossy(&plain).split_once(':') {
        Some((user, pass)) => RegistryAuth::Basic(user.to_owned(), pass.to_owned()),
        None => RegistryAuth::Anonymous,
    }
}

async fn write_blob(layout: &Path, digest: &str, bytes: &[u8]) -> Result<()> {
    let path = layout.join(crate::source::blob_path(digest)?);
    tokio::fs::write(&path, bytes)
        .await
        .map_err(crate::error::io(format!("writing {}", path.display())))
}

/// Pulls the linux/amd64 image `reference` names into a new OCI image
/// layout at `layout`.
pub async fn pull(reference: &Reference, layout: &Path, progress: &(dyn Fn(&str) + Sync)) -> Result<()> {
    let registry = reference.resolve_registry().to_string();
    let client = Client::new(ClientConfig {
        protocol: protocol(&registry),
        ..Default::default()
    });
    let auth = credentials(&registry);
    let blobs = layout.join("blobs/sha256");
    tokio::fs::create_dir_all(&blobs)
        .await
        .map_err(crate::error::io(format!("creating {}", blobs.display())))?;
    progress(&format!("pulling {}", reference.whole()));
    let (mut bytes, mut digest) = client
        .pull_manifest_raw(reference, &auth, &ACCEPTED)
        .await
        .map_err(|e| registry_error(reference, e))?;
    // An index (a multi-platform image): take its linux/amd64 manifest.
    for _ in 0..4 {
        let Some(chosen) = index_choice(&bytes)? else {
            break;
        };
        write_blob(layout, &digest, &bytes).await?;
        let by_digest = reference.clone_with_digest(chosen);
        (bytes, digest) = client
            .pull_manifest_raw(&by_digest, &auth, &ACCEPTED)
            .await
            .map_err(|e| registry_error(reference, e))?;
    }
    if sha256_hex(&bytes) != digest {
        return Err(Error::DigestMismatch {
            what: format!("the manifest of {}", reference.whole()),
            expected: digest,
            actual: sha256_hex(&bytes),
        });
    }
    write_blob(layout, &digest, &bytes).await?;
    #[derive(Deserialize)]
    struct Desc {
        digest: String,
        #[serde(default)]
        size: u64,
    }
    #[derive(Deserialize)]
    struct Manifest {
        config: Desc,
        layers: Vec<Desc>,
    }
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Invalid(format!("manifest of {}: {e}", reference.whole())))?;
    let total = manifest.layers.len();
    for (i, d) in std::iter::once(&manifest.config)
        .chain(&manifest.layers)
        .enumerate()
    {
        let path = layout.join(crate::source::blob_path(&d.digest)?);
        if i > 0 {
            progress(&format!("pulling layer {i}/{total} ({} MiB)", d.size >> 20));
        }
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(crate::error::io(format!("creating {}", path.display())))?;
        client
            .pull_blob(reference, d.digest.as_str(), file)
            .await
            .map_err(|e| registry_error(reference, e))?;
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "digest": digest,
            "size": bytes.len(),
        }],
    });
    let write = |name: &str, text: String| {
        let p = layout.join(name);
        std::fs::write(&p, text).map_err(crate::error::io(format!("writing {}", p.display())))
    };
    write("index.json", index.to_string())?;
    write("oci-layout", r#"{"imageLayoutVersion":"1.0.0"}"#.into())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_plain_http_others_https() {
        assert!(matches!(protocol("127.0.0.1:5000"), ClientProtocol::Http));
        assert!(matches!(protocol("localhost:5000"), ClientProtocol::Http));
        assert!(matches!(protocol("index.docker.io"), ClientProtocol::Https));
        assert!(matches!(protocol("ghcr.io"), ClientProtocol::Https));
    }

    #[test]
    fn references_are_normalised() {
        let r = parse("python:3.12").unwrap();
        assert_eq!(r.resolve_registry(), "index.docker.io");
        assert_eq!(r.repository(), "library/python");
        assert!(parse("Not A Reference!").is_err());
    }
}
