//! Bundles from elsewhere: an `https://` URL, or an entry of a catalog a
//! team hosts (a small TOML file: name, kind, arch, URL, sha256, size).
//!
//! A download goes into the state's staging directory, bounded in size and
//! hashed as it arrives; its sha256 and size are checked against the pin
//! (the catalog's, or `--sha256`) before the bundle is unpacked like a
//! local file, where every member's own hash is checked again. The file is
//! removed whatever happens. Only `https` is fetched: a bundle is code
//! that will run as a guest's root filesystem.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A bundle without a size pin may be at most this large.
const MAX_BUNDLE: u64 = 64 << 30;
/// A catalog is a small file.
const MAX_CATALOG: u64 = 1 << 20;
/// No byte for this long ends a download.
const STALL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{0}")]
    Refused(String),
    #[error("fetching {url}: {detail}")]
    Fetch { url: String, detail: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("catalog {at}: {detail}")]
    Catalog { at: String, detail: String },
}

/// One bundle a catalog offers.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub name: String,
    /// `image` or `kernel`.
    pub kind: String,
    pub arch: String,
    pub url: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Catalog {
    #[serde(default)]
    bundle: Vec<Entry>,
}

/// Where a bundle comes from, once resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Https {
        url: String,
        sha256: Option<String>,
        size: Option<u64>,
    },
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn check_url(url: &str) -> Result<(), RemoteError> {
    let u =
        reqwest::Url::parse(url).map_err(|e| RemoteError::Refused(format!("{url:?} is not a URL: {e}")))?;
    if u.scheme() != "https" {
        return Err(RemoteError::Refused(format!(
            "{url:?}: only https:// URLs are fetched (a bundle becomes a guest's root filesystem)"
        )));
    }
    if u.host_str().is_none() || !u.username().is_empty() || u.password().is_some() {
        return Err(RemoteError::Refused(format!(
            "{url:?}: a host is needed, and no credentials in the URL"
        )));
    }
    Ok(())
}

/// What `src` names: an absolute file, an https URL, or (anything else
/// that is a plain name) an entry of `catalog` of the wanted `kind`.
pub async fn resolve(
    src: &str,
    sha256: Option<&str>,
    catalog: Option<&str>,
    kind: &str,
) -> Result<Source, RemoteError> {
    if let Some(h) = sha256 {
        if !is_hex64(h) {
            return Err(RemoteError::Refused(format!(
                "--sha256 wants 64 lowercase hex digits, not {h:?}"
            )));
        }
    }
    if src.starts_with('/') {
        return Ok(Source::File(PathBuf::from(src)));
    }
    if src.contains("://") {
        check_url(src)?;
        return Ok(Source::Https {
            url: src.to_string(),
            sha256: sha256.map(String::from),
            size: None,
        });
    }
    let Some(at) = catalog else {
        return Err(RemoteError::Refused(format!(
            "{src:?} is neither an absolute path nor an https URL, and no catalog is set \
             (--catalog, or `catalog` in config.toml)"
        )));
    };
    let e = lookup(at, src, kind).await?;
    Ok(Source::Https {
        url: e.url,
        sha256: Some(e.sha256),
        size: Some(e.size),
    })
}

/// The entry `name` of the catalog at `at` (an absolute path or an https
/// URL), checked: this host's architecture, the kind asked for, a pinned
/// hash and size, an https URL.
pub async fn lookup(at: &str, name: &str, kind: &str) -> Result<Entry, RemoteError> {
    let text = if at.starts_with('/') {
        if Path::new(at).exists() && !Path::new(at).is_file() {
            return Err(RemoteError::Catalog {
                at: at.into(),
                detail: "not a file".into(),
            });
        }
        let mut s = String::new();
        use std::io::Read;
        std::fs::File::open(at)
            .map_err(|source| RemoteError::Io {
                what: format!("opening catalog {at}"),
                source,
            })?
            .take(MAX_CATALOG + 1)
            .read_to_string(&mut s)
            .map_err(|source| RemoteError::Io {
                what: format!("reading catalog {at}"),
                source,
            })?;
        s
    } else {
        check_url(at)?;
        let body = get_small(at, MAX_CATALOG).await?;
        String::from_utf8(body).map_err(|_| RemoteError::Catalog {
            at: at.into(),
            detail: "not UTF-8".into(),
        })?
    };
    if text.len() as u64 > MAX_CATALOG {
        return Err(RemoteError::Catalog {
            at: at.into(),
            detail: "larger than 1 MiB".into(),
        });
    }
    let cat: Catalog = toml::from_str(&text).map_err(|e| RemoteError::Catalog {
        at: at.into(),
        detail: e.to_string(),
    })?;
    let arch = std::env::consts::ARCH;
    let e = cat
        .bundle
        .into_iter()
        .find(|e| e.name == name && e.kind == kind && e.arch == arch)
        .ok_or_else(|| RemoteError::Catalog {
            at: at.into(),
            detail: format!("no {kind} named {name:?} for {arch}"),
        })?;
    if !is_hex64(&e.sha256) {
        return Err(RemoteError::Catalog {
            at: at.into(),
            detail: format!("{name}: sha256 must be 64 lowercase hex digits"),
        });
    }
    check_url(&e.url)?;
    Ok(e)
}

fn client() -> Result<reqwest::Client, RemoteError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .read_timeout(STALL)
        .user_agent(concat!("banger/", env!("CARGO_PKG_VERSION")))
        // Redirects stay on https: a hop to http is refused.
        .redirect(reqwest::redirect::Policy::custom(|a| {
            if a.url().scheme() != "https" {
                a.error("redirected away from https")
            } else if a.previous().len() > 5 {
                a.stop()
            } else {
                a.follow()
            }
        }))
        .build()
        .map_err(|e| RemoteError::Fetch {
            url: String::new(),
            detail: e.to_string(),
        })
}

fn fetch_err(url: &str) -> impl Fn(reqwest::Error) -> RemoteError + '_ {
    move |e| {
        // The whole chain: "error sending request" alone says nothing.
        let mut detail = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            detail.push_str(&format!(": {s}"));
            src = s.source();
        }
        RemoteError::Fetch {
            url: url.into(),
            detail,
        }
    }
}

/// A GET whose answer is a success, or an error that says why not.
async fn get(url: &str) -> Result<reqwest::Response, RemoteError> {
    client()?
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(fetch_err(url))
}

async fn get_small(url: &str, max: u64) -> Result<Vec<u8>, RemoteError> {
    let mut resp = get(url).await?;
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(fetch_err(url))? {
        out.extend_from_slice(&chunk);
        if out.len() as u64 > max {
            return Err(RemoteError::Fetch {
                url: url.into(),
                detail: format!("larger than {max} bytes"),
            });
        }
    }
    Ok(out)
}

/// Downloads `url` to `dest` (created new), bounded by the pinned `size`
/// (or [`MAX_BUNDLE`]), hashing as it goes; refuses a size or hash that is
/// not the pinned one. `dest` is removed on any failure.
pub async fn download(
    url: &str,
    sha256: Option<&str>,
    size: Option<u64>,
    dest: &Path,
) -> Result<(), RemoteError> {
    let r = download_in(url, sha256, size, dest).await;
    if r.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    r
}

async fn download_in(
    url: &str,
    sha256: Option<&str>,
    size: Option<u64>,
    dest: &Path,
) -> Result<(), RemoteError> {
    use std::io::Write;
    let limit = size.unwrap_or(MAX_BUNDLE);
    let mut resp = get(url).await?;
    if let Some(len) = resp.content_length() {
        if len > limit || size.is_some_and(|s| s != len) {
            return Err(RemoteError::Fetch {
                url: url.into(),
                detail: format!("the server offers {len} bytes, the pin says {limit}"),
            });
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|source| RemoteError::Io {
            what: format!("creating {}", dest.display()),
            source,
        })?;
    let mut h = Sha256::new();
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await.map_err(fetch_err(url))? {
        got += chunk.len() as u64;
        if got > limit {
            return Err(RemoteError::Fetch {
                url: url.into(),
                detail: format!("more than the {limit} bytes pinned"),
            });
        }
        h.update(&chunk);
        f.write_all(&chunk).map_err(|source| RemoteError::Io {
            what: format!("writing {}", dest.display()),
            source,
        })?;
    }
    if let Some(want) = size {
        if got != want {
            return Err(RemoteError::Fetch {
                url: url.into(),
                detail: format!("{got} bytes arrived, the pin says {want}"),
            });
        }
    }
    let have = format!("{:x}", h.finalize());
    if let Some(want) = sha256 {
        if have != want {
            return Err(RemoteError::Fetch {
                url: url.into(),
                detail: format!("sha256 {have} is not the pinned {want}"),
            });
        }
    }
    f.sync_all().map_err(|source| RemoteError::Io {
        what: format!("syncing {}", dest.display()),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sources_resolve_and_bad_ones_are_refused() {
        assert_eq!(
            resolve("/x/b.tar.zst", None, None, "image").await.unwrap(),
            Source::File("/x/b.tar.zst".into())
        );
        assert!(matches!(
            resolve("https://example.org/b.tar.zst", None, None, "image")
                .await
                .unwrap(),
            Source::Https {
                size: None,
                sha256: None,
                ..
            }
        ));
        for bad in [
            "http://example.org/b.tar.zst",
            "ftp://example.org/b",
            "https://user:pw@example.org/b",
            "file:///etc/passwd",
        ] {
            assert!(
                matches!(
                    resolve(bad, None, None, "image").await,
                    Err(RemoteError::Refused(_))
                ),
                "{bad} was accepted"
            );
        }
        // A plain name needs a catalog.
        assert!(resolve("default", None, None, "image").await.is_err());
        assert!(resolve("/x", Some("ABC"), None, "image").await.is_err());
    }

    #[tokio::test]
    async fn a_catalog_entry_must_fit_this_host_and_be_pinned() {
        let d = tempfile::tempdir().unwrap();
        let arch = std::env::consts::ARCH;
        let h = "a".repeat(64);
        let cat = d.path().join("catalog.toml");
        std::fs::write(
            &cat,
            format!(
                r#"
[[bundle]]
name = "dev"
kind = "image"
arch = "{arch}"
url = "https://example.org/dev.tar.zst"
sha256 = "{h}"
size = 10

[[bundle]]
name = "other-arch"
kind = "image"
arch = "sparc"
url = "https://example.org/x.tar.zst"
sha256 = "{h}"
size = 10

[[bundle]]
name = "plain"
kind = "image"
arch = "{arch}"
url = "http://example.org/x.tar.zst"
sha256 = "{h}"
size = 10
"#
            ),
        )
        .unwrap();
        let at = cat.to_str().unwrap();
        assert_eq!(
            resolve("dev", None, Some(at), "image").await.unwrap(),
            Source::Https {
                url: "https://example.org/dev.tar.zst".into(),
                sha256: Some(h.clone()),
                size: Some(10)
            }
        );
        assert!(resolve("dev", None, Some(at), "kernel").await.is_err());
        assert!(resolve("other-arch", None, Some(at), "image").await.is_err());
        assert!(resolve("plain", None, Some(at), "image").await.is_err());
        std::fs::write(&cat, "[[bundle]]\nname = 1\n").unwrap();
        assert!(matches!(
            resolve("dev", None, Some(at), "image").await,
            Err(RemoteError::Catalog { .. })
        ));
    }
}
