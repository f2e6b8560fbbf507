//! Image bundles: one `.tar.zst` file that carries an image and its kernel
//! to another machine, with every member's sha256 pinned in a manifest.
//!
//! Layout: `manifest.json` first, then `rootfs.ext4`, then `kernel/…` (the
//! kernel directory's files: `vmlinuz`, `vmlinux`, `manifest.json`,
//! `modules/*`; never the initramfs, which banger rebuilds).
//!
//! Reading a bundle treats it as hostile: the manifest must come first and
//! be small; every later member must be a regular file the manifest names,
//! at a plain relative path, seen once, of the declared size and hash
//! (checked while it streams to a staging directory); nothing may be
//! missing or extra. Only then does the caller publish it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

pub const FORMAT: u32 = 1;
const MAX_MANIFEST: u64 = 1 << 20;
const MAX_MEMBERS: usize = 4096;
const MAX_MEMBER_BYTES: u64 = 64 << 30;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("not a banger bundle: {0}")]
    Refused(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BundleError {
    let what = what.into();
    move |source| BundleError::Io { what, source }
}

fn refused(why: impl Into<String>) -> BundleError {
    BundleError::Refused(why.into())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub path: String,
    pub size: u64,
    /// Hex sha256 of the member's bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: u32,
    pub kind: String,
    pub name: String,
    pub arch: String,
    pub kernel_version: String,
    pub members: Vec<Member>,
}

impl Manifest {
    pub fn member(&self, path: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.path == path)
    }
}

/// Hex sha256 of a file.
pub fn sha256_file(p: &Path) -> Result<String, BundleError> {
    sha256_of(p).map(|(_, h)| h)
}

fn sha256_of(p: &Path) -> Result<(u64, String), BundleError> {
    let mut f = std::fs::File::open(p).map_err(io(format!("opening {}", p.display())))?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h).map_err(io(format!("reading {}", p.display())))?;
    Ok((n, format!("{:x}", h.finalize())))
}

/// The kernel directory's files a bundle carries, as (bundle path, file).
fn kernel_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, BundleError> {
    let mut out = Vec::new();
    for name in ["vmlinuz", "vmlinux", "manifest.json"] {
        let p = dir.join(name);
        if p.is_file() {
            out.push((format!("kernel/{name}"), p));
        }
    }
    let modules = dir.join("modules");
    if let Ok(rd) = std::fs::read_dir(&modules) {
        let mut names: Vec<String> = rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            out.push((format!("kernel/modules/{n}"), modules.join(&n)));
        }
    }
    Ok(out)
}

/// Writes the bundle of an image (its rootfs and its kernel directory), or
/// of a kernel alone when `rootfs` is `None`, to `out`, atomically: a
/// partial file never has the final name.
pub fn export(
    name: &str,
    rootfs: Option<&Path>,
    kernel_dir: &Path,
    kernel_version: &str,
    out: &Path,
) -> Result<Manifest, BundleError> {
    let mut files: Vec<(String, PathBuf)> = rootfs
        .map(|r| ("rootfs.ext4".to_string(), r.to_path_buf()))
        .into_iter()
        .collect();
    files.extend(kernel_files(kernel_dir)?);
    let mut members = Vec::new();
    for (path, file) in &files {
        let (size, sha256) = sha256_of(file)?;
        members.push(Member {
            path: path.clone(),
            size,
            sha256,
        });
    }
    let manifest = Manifest {
        format: FORMAT,
        kind: if rootfs.is_some() { "image" } else { "kernel" }.into(),
        name: name.into(),
        arch: std::env::consts::ARCH.into(),
        kernel_version: kernel_version.into(),
        members,
    };
    let tmp = out.with_extension("partial");
    let f = std::fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    let result = (|| {
        let enc = zstd::Encoder::new(f, 3).map_err(io("starting zstd"))?;
        let mut tar = tar::Builder::new(enc);
        let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        let mut h = tar::Header::new_gnu();
        h.set_size(json.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, "manifest.json", json.as_slice())
            .map_err(io("writing the manifest"))?;
        for (path, file) in &files {
            let mut f = std::fs::File::open(file).map_err(io(format!("opening {}", file.display())))?;
            let mut h = tar::Header::new_gnu();
            h.set_size(f.metadata().map_err(io("stat"))?.len());
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, path, &mut f)
                .map_err(io(format!("writing {path}")))?;
        }
        let enc = tar.into_inner().map_err(io("finishing the archive"))?;
        let f = enc.finish().map_err(io("finishing zstd"))?;
        f.sync_all().map_err(io("syncing the bundle"))?;
        std::fs::rename(&tmp, out).map_err(io(format!("renaming to {}", out.display())))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|_| manifest)
}

/// A member path as a bundle may name it: relative, plain components of
/// `[A-Za-z0-9._-]`, no `..`, at most 255 bytes.
fn safe_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 255
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(s) if s != "." && s != ".."))
}

fn check_manifest(m: &Manifest) -> Result<(), BundleError> {
    if m.format != FORMAT || !(m.kind == "image" || m.kind == "kernel") {
        return Err(refused(format!(
            "format {} kind {:?} is not a bundle this build reads",
            m.format, m.kind
        )));
    }
    if m.arch != std::env::consts::ARCH {
        return Err(refused(format!(
            "built for {}, this host is {}",
            m.arch,
            std::env::consts::ARCH
        )));
    }
    if m.members.len() > MAX_MEMBERS {
        return Err(refused(format!("{} members", m.members.len())));
    }
    if !safe_path(&m.kernel_version) || m.kernel_version.contains('/') {
        return Err(refused(format!("kernel version {:?}", m.kernel_version)));
    }
    let mut seen = std::collections::HashSet::new();
    for x in &m.members {
        if !safe_path(&x.path) || x.path == "manifest.json" {
            return Err(refused(format!("unsafe member path {:?}", x.path)));
        }
        if !((x.path == "rootfs.ext4" && m.kind == "image") || x.path.starts_with("kernel/")) {
            return Err(refused(format!("unexpected member {:?}", x.path)));
        }
        if !seen.insert(x.path.as_str()) {
            return Err(refused(format!("member {:?} listed twice", x.path)));
        }
        if x.size > MAX_MEMBER_BYTES
            || x.sha256.len() != 64
            || !x.sha256.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(refused(format!("member {:?}: bad size or hash", x.path)));
        }
    }
    let needed: &[&str] = match m.kind.as_str() {
        "image" => &["rootfs.ext4", "kernel/vmlinuz", "kernel/manifest.json"],
        _ => &["kernel/vmlinuz", "kernel/manifest.json"],
    };
    for needed in needed {
        if m.member(needed).is_none() {
            return Err(refused(format!("no {needed}")));
        }
    }
    Ok(())
}

/// Reads and verifies the bundle at `src` into `staging` (which must not
/// exist; it is left for the caller to publish or remove). Every check of
/// the module's header holds, or an error and `staging` removed.
pub fn unpack(src: &Path, staging: &Path) -> Result<Manifest, BundleError> {
    let r = unpack_in(src, staging);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(staging);
    }
    r
}

fn unpack_in(src: &Path, staging: &Path) -> Result<Manifest, BundleError> {
    let f = std::fs::File::open(src).map_err(io(format!("opening {}", src.display())))?;
    if !f.metadata().map_err(io("reading its metadata"))?.is_file() {
        return Err(refused(format!("{} is not a file", src.display())));
    }
    let dec = zstd::Decoder::new(f).map_err(io("starting zstd"))?;
    let mut ar = tar::Archive::new(dec);
    let mut entries = ar.entries().map_err(io("reading the archive"))?;
    std::fs::create_dir(staging).map_err(io(format!("creating {}", staging.display())))?;

    let mut first = entries
        .next()
        .ok_or_else(|| refused("empty archive"))?
        .map_err(io("reading the first member"))?;
    let first_path = first.path().map_err(io("member path"))?.display().to_string();
    if first_path != "manifest.json" || first.header().entry_type() != tar::EntryType::Regular {
        return Err(refused(format!(
            "the first member is {first_path:?}, not manifest.json"
        )));
    }
    if first.header().size().unwrap_or(u64::MAX) > MAX_MANIFEST {
        return Err(refused("manifest larger than 1 MiB"));
    }
    let mut json = Vec::new();
    (&mut first)
        .take(MAX_MANIFEST)
        .read_to_end(&mut json)
        .map_err(io("reading the manifest"))?;
    let manifest: Manifest = serde_json::from_slice(&json).map_err(|e| refused(format!("manifest: {e}")))?;
    check_manifest(&manifest)?;

    let mut done: BTreeMap<String, ()> = BTreeMap::new();
    for e in entries {
        let mut e = e.map_err(io("reading a member"))?;
        let path = e.path().map_err(io("member path"))?.display().to_string();
        if e.header().entry_type() != tar::EntryType::Regular {
            return Err(refused(format!("{path:?} is not a regular file")));
        }
        let Some(want) = manifest.member(&path) else {
            return Err(refused(format!("unexpected member {path:?}")));
        };
        if done.insert(path.clone(), ()).is_some() {
            return Err(refused(format!("member {path:?} appears twice")));
        }
        let dest = staging.join(&path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dest)
            .map_err(io(format!("creating {}", dest.display())))?;
        // Hash while copying; never more than declared.
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut limited = (&mut e).take(want.size + 1);
        loop {
            let k = limited.read(&mut buf).map_err(io(format!("reading {path}")))?;
            if k == 0 {
                break;
            }
            n += k as u64;
            if n > want.size {
                return Err(refused(format!("{path} is larger than its manifest says")));
            }
            h.update(&buf[..k]);
            out.write_all(&buf[..k])
                .map_err(io(format!("writing {}", dest.display())))?;
        }
        if n != want.size {
            return Err(refused(format!(
                "{path} is {n} bytes, its manifest says {}",
                want.size
            )));
        }
        let got = format!("{:x}", h.finalize());
        if got != want.sha256 {
            return Err(refused(format!(
                "{path} does not match its sha256 (got {got}, pinned {})",
                want.sha256
            )));
        }
        out.sync_all()
            .map_err(io(format!("syncing {}", dest.display())))?;
    }
    if let Some(m) = manifest.members.iter().find(|m| !done.contains_key(&m.path)) {
        return Err(refused(format!("member {:?} is missing", m.path)));
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_paths_must_be_plain_and_relative() {
        for ok in ["rootfs.ext4", "kernel/vmlinuz", "kernel/modules/virtio.ko"] {
            assert!(safe_path(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "kernel/../../x", "kernel/a b", "x\0y"] {
            assert!(!safe_path(bad), "{bad:?}");
        }
    }
}
