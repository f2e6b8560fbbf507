//! Where an image's manifest, config and layers come from: an OCI image
//! layout directory, or an archive of one (`docker save` of Docker 25+
//! writes both formats at once), or the older `docker save` archive
//! (`manifest.json` plus one directory per layer).
//!
//! Archives are not extracted: they are indexed once and each blob is read
//! in place. Every blob's digest is checked as it is read.

use crate::error::io;
use crate::{Error, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Manifests, configs and indexes are small; anything larger is refused
/// before it is parsed.
const MAX_JSON: u64 = 4 << 20;
/// Nested image indexes followed at most this deep.
const MAX_INDEX_DEPTH: usize = 4;

const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// An image ready to be unpacked.
pub struct Image {
    /// What identifies it: the manifest digest for an OCI image, the config
    /// digest (Docker's image ID) for an old `docker save` archive.
    pub digest: String,
    pub layers: Vec<Layer>,
    /// `rootfs.diff_ids` from the config: the digests of the uncompressed
    /// layers, checked as each one is unpacked.
    pub diff_ids: Vec<String>,
    blobs: Blobs,
}

pub struct Layer {
    path: String,
    /// The blob's own digest, when a manifest gives one.
    digest: Option<String>,
}

/// Opens the image at `path`: a layout directory, or an archive (plain or
/// gzip-compressed; a compressed one is decompressed into `work` first).
pub fn open(path: &Path, work: &Path) -> Result<Image> {
    let meta = std::fs::metadata(path).map_err(io(format!("reading {}", path.display())))?;
    let blobs = if meta.is_dir() {
        Blobs::Dir(path.to_path_buf())
    } else {
        let plain = decompress_archive(path, work)?;
        Blobs::archive(&plain)?
    };
    if blobs.exists("oci-layout") && blobs.exists("index.json") {
        oci(blobs)
    } else if blobs.exists("manifest.json") {
        docker(blobs)
    } else {
        Err(Error::NotAnImage {
            path: path.to_path_buf(),
        })
    }
}

impl Image {
    /// Unpacks layer `i` into a plain tar file at `dest`, checking the
    /// blob's digest and the uncompressed layer's diff id on the way.
    pub fn unpack_layer(&self, i: usize, dest: &Path) -> Result<u64> {
        let layer = &self.layers[i];
        let what = format!("layer {} ({})", i + 1, layer.path);
        let blob = HashingReader::new(self.blobs.open(&layer.path)?);
        let mut blob = BufReader::with_capacity(1 << 16, blob);
        let head = blob.fill_buf().map_err(io(format!("reading {what}")))?;
        let mut plain: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(&mut blob))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(&mut blob).map_err(io(format!("reading {what}")))?,
            )
        } else {
            Box::new(&mut blob)
        };
        let mut out =
            HashingWriter::new(File::create(dest).map_err(io(format!("creating {}", dest.display())))?);
        let n = std::io::copy(&mut plain, &mut out).map_err(io(format!("unpacking {what}")))?;
        drop(plain);
        // Whatever follows the compressed stream still counts for the digest.
        std::io::copy(&mut blob, &mut std::io::sink()).map_err(io(format!("reading {what}")))?;
        if let Some(expected) = &layer.digest {
            check(&what, expected, &blob.into_inner().digest())?;
        }
        if let Some(expected) = self.diff_ids.get(i) {
            check(&format!("{what}, uncompressed"), expected, &out.digest())?;
        }
        Ok(n)
    }
}

fn check(what: &str, expected: &str, actual: &str) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::DigestMismatch {
            what: what.into(),
            expected: expected.into(),
            actual: actual.into(),
        })
    }
}

/// `sha256:<64 hex>`, the only digest form accepted: it is also the path
/// of the blob, so nothing else may get near a file name.
pub(crate) fn blob_path(digest: &str) -> Result<String> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(format!("blobs/sha256/{hex}"))
        }
        _ => Err(Error::Unsupported(format!("digest {digest:?} (only sha256 is)"))),
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize, Default)]
struct Config {
    #[serde(default)]
    rootfs: RootFs,
    #[serde(default)]
    architecture: String,
}

#[derive(Deserialize, Default)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Invalid(format!("{what}: {e}")))
}

fn is_index(media_type: &str) -> bool {
    media_type == MT_OCI_INDEX || media_type == MT_DOCKER_LIST
}

/// The one linux/amd64 image of an index; an index of one image without a
/// platform is taken as that image.
fn pick(manifests: &[Descriptor]) -> Option<&Descriptor> {
    let amd64 = |d: &&Descriptor| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    };
    manifests.iter().find(amd64).or_else(|| match manifests {
        [only] if only.platform.is_none() => Some(only),
        _ => None,
    })
}

/// If `bytes` are an image index, the digest of its linux/amd64 manifest.
pub(crate) fn index_choice(bytes: &[u8]) -> Result<Option<String>> {
    let index: Index = parse("manifest", bytes)?;
    if !is_index(&index.media_type) && index.manifests.is_empty() {
        return Ok(None);
    }
    let d = pick(&index.manifests).ok_or_else(|| Error::NoPlatform("the registry's image index".into()))?;
    blob_path(&d.digest)?;
    Ok(Some(d.digest.clone()))
}

fn oci(blobs: Blobs) -> Result<Image> {
    let mut index: Index = parse("index.json", &blobs.read_small("index.json")?)?;
    let mut what = "index.json".to_string();
    for _ in 0..MAX_INDEX_DEPTH {
        let d = pick(&index.manifests).ok_or_else(|| Error::NoPlatform(what.clone()))?;
        let bytes = blobs.read_small(&blob_path(&d.digest)?)?;
        check(&format!("manifest {}", d.digest), &d.digest, &sha256_hex(&bytes))?;
        let nested: Index = parse(&d.digest, &bytes)?;
        if is_index(&d.media_type) || is_index(&nested.media_type) || !nested.manifests.is_empty() {
            what = d.digest.clone();
            index = nested;
            continue;
        }
        let manifest: Manifest = parse(&d.digest, &bytes)?;
        let config_bytes = blobs.read_small(&blob_path(&manifest.config.digest)?)?;
        check(
            "image config",
            &manifest.config.digest,
            &sha256_hex(&config_bytes),
        )?;
        let config: Config = parse("image config", &config_bytes)?;
        check_arch(&config)?;
        let layers = manifest
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    path: blob_path(&l.digest)?,
                    digest: Some(l.digest.clone()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        return image(d.digest.clone(), layers, config, blobs);
    }
    Err(Error::Invalid(format!(
        "image indexes nested more than {MAX_INDEX_DEPTH} deep"
    )))
}

fn check_arch(config: &Config) -> Result<()> {
    match config.architecture.as_str() {
        "" | "amd64" => Ok(()),
        other => Err(Error::Unsupported(format!("a {other} image (guests are x86-64)"))),
    }
}

fn image(digest: String, layers: Vec<Layer>, config: Config, blobs: Blobs) -> Result<Image> {
    let diff_ids = config.rootfs.diff_ids;
    if !diff_ids.is_empty() && diff_ids.len() != layers.len() {
        return Err(Error::Invalid(format!(
            "{} layers but {} diff ids in the config",
            layers.len(),
            diff_ids.len()
        )));
    }
    Ok(Image {
        digest,
        layers,
        diff_ids,
        blobs,
    })
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

fn docker(blobs: Blobs) -> Result<Image> {
    let list: Vec<DockerManifest> = parse("manifest.json", &blobs.read_small("manifest.json")?)?;
    let m = match list.as_slice() {
        [one] => one,
        [] => return Err(Error::Invalid("manifest.json lists no image".into())),
        more => {
            return Err(Error::Unsupported(format!(
                "an archive of {} images (save one image per archive)",
                more.len()
            )))
        }
    };
    let config_bytes = blobs.read_small(&m.config)?;
    let config: Config = parse("image config", &config_bytes)?;
    check_arch(&config)?;
    let layers = m
        .layers
        .iter()
        .map(|p| Layer {
            path: p.clone(),
            digest: None,
        })
        .collect();
    image(sha256_hex(&config_bytes), layers, config, blobs)
}

/// Where blobs are read from.
enum Blobs {
    Dir(PathBuf),
    /// An uncompressed tar: each member's data offset and size, by its
    /// normalised path (symlinks and hard links already resolved).
    Archive {
        file: PathBuf,
        members: HashMap<String, (u64, u64)>,
    },
}

/// An archive path as a key: no leading `./` or `/`, no `.` components,
/// `..` resolved (and clamped at the top).
fn normalise(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

impl Blobs {
    fn archive(path: &Path) -> Result<Blobs> {
        let f = File::open(path).map_err(io(format!("opening {}", path.display())))?;
        let mut ar = tar::Archive::new(BufReader::new(f));
        let mut members = HashMap::new();
        let mut links: Vec<(String, String)> = Vec::new();
        let what = || format!("reading {}", path.display());
        for e in ar.entries().map_err(io(what()))? {
            let e = e.map_err(io(what()))?;
            let name = normalise(&String::from_utf8_lossy(&e.path_bytes()));
            match e.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    members.insert(name, (e.raw_file_position(), e.size()));
                }
                tar::EntryType::Symlink => {
                    let target =
                        String::from_utf8_lossy(&e.link_name_bytes().unwrap_or_default()).into_owned();
                    let parent = name.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
                    let resolved = if target.starts_with('/') {
                        normalise(&target)
                    } else {
                        normalise(&format!("{parent}/{target}"))
                    };
                    links.push((name, resolved));
                }
                tar::EntryType::Link => {
                    let target =
                        String::from_utf8_lossy(&e.link_name_bytes().unwrap_or_default()).into_owned();
                    links.push((name, normalise(&target)));
                }
                _ => {}
            }
        }
        // `docker save` links identical layers to one copy; links to links
        // are followed a few times, never in a cycle.
        for _ in 0..8 {
            let mut progressed = false;
            for (name, target) in &links {
                if !members.contains_key(name) {
                    if let Some(&m) = members.get(target) {
                        members.insert(name.clone(), m);
                        progressed = true;
                    }
                }
            }
            if !progressed {
                break;
            }
        }
        Ok(Blobs::Archive {
            file: path.to_path_buf(),
            members,
        })
    }

    fn exists(&self, name: &str) -> bool {
        match self {
            Blobs::Dir(d) => d.join(name).is_file(),
            Blobs::Archive { members, .. } => members.contains_key(name),
        }
    }

    fn open(&self, name: &str) -> Result<Box<dyn Read + Send + '_>> {
        let name = normalise(name);
        match self {
            Blobs::Dir(d) => {
                let p = d.join(&name);
                let f = File::open(&p).map_err(io(format!("opening {}", p.display())))?;
                Ok(Box::new(f))
            }
            Blobs::Archive { file, members } => {
                let &(offset, size) = members
                    .get(&name)
                    .ok_or_else(|| Error::Invalid(format!("{name} is missing from the archive")))?;
                let mut f = File::open(file).map_err(io(format!("opening {}", file.display())))?;
                f.seek(SeekFrom::Start(offset))
                    .map_err(io(format!("reading {name}")))?;
                Ok(Box::new(f.take(size)))
            }
        }
    }

    fn read_small(&self, name: &str) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.open(name)?
            .take(MAX_JSON + 1)
            .read_to_end(&mut buf)
            .map_err(io(format!("reading {name}")))?;
        if buf.len() as u64 > MAX_JSON {
            return Err(Error::Invalid(format!(
                "{name} is larger than {} MiB",
                MAX_JSON >> 20
            )));
        }
        Ok(buf)
    }
}

/// A gzip-compressed archive (`docker save | gzip`) decompressed into
/// `work`; a plain one is used where it is.
fn decompress_archive(path: &Path, work: &Path) -> Result<PathBuf> {
    let mut f = BufReader::new(File::open(path).map_err(io(format!("opening {}", path.display())))?);
    let head = f.fill_buf().map_err(io(format!("reading {}", path.display())))?;
    if !head.starts_with(&[0x1f, 0x8b]) {
        return Ok(path.to_path_buf());
    }
    let out = work.join("archive.tar");
    let mut w = File::create(&out).map_err(io(format!("creating {}", out.display())))?;
    std::io::copy(&mut flate2::read::MultiGzDecoder::new(f), &mut w)
        .map_err(io(format!("decompressing {}", path.display())))?;
    Ok(out)
}

struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hash: Sha256::new(),
        }
    }
    fn digest(self) -> String {
        format!("sha256:{:x}", self.hash.finalize())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
}

impl<W: std::io::Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: Sha256::new(),
        }
    }
    fn digest(self) -> String {
        format!("sha256:{:x}", self.hash.finalize())
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lowercase_sha256_digests_become_paths() {
        let hex = "a".repeat(64);
        assert_eq!(
            blob_path(&format!("sha256:{hex}")).unwrap(),
            format!("blobs/sha256/{hex}")
        );
        for bad in [
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:../../{}", "a".repeat(58)),
            format!("sha512:{hex}"),
            "sha256:abc".to_string(),
        ] {
            assert!(blob_path(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn archive_paths_stay_inside() {
        assert_eq!(normalise("./blobs/sha256/x"), "blobs/sha256/x");
        assert_eq!(normalise("/../../etc/passwd"), "etc/passwd");
        assert_eq!(normalise("a/../b/./c"), "b/c");
    }

    #[test]
    fn an_index_picks_linux_amd64() {
        let idx: Index = serde_json::from_str(
            r#"{"manifests":[
                {"digest":"sha256:1","platform":{"architecture":"arm64","os":"linux"}},
                {"digest":"sha256:2","platform":{"architecture":"amd64","os":"linux"}}]}"#,
        )
        .unwrap();
        assert_eq!(pick(&idx.manifests).unwrap().digest, "sha256:2");
        let arm: Index = serde_json::from_str(
            r#"{"manifests":[{"digest":"sha256:1","platform":{"architecture":"arm64","os":"linux"}}]}"#,
        )
        .unwrap();
        assert!(pick(&arm.manifests).is_none());
    }
}
