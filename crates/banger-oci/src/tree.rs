//! The image's filesystem, flattened in memory: layers are applied in
//! order, whiteouts remove what lower layers made, and each file keeps only
//! where its bytes are (layer, offset, size), so nothing is written until
//! the final tree is known.
//!
//! Paths are resolved as if the image's root were `/`: a symlink in a
//! parent component is followed inside the tree (absolute targets start
//! again at the image's root), `..` stops at the root, and the last
//! component is never followed (an entry replaces a symlink, it does not
//! write through it).

use crate::error::io;
use crate::{Error, Result};
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// Symlinks followed while resolving one path, as the kernel allows.
const MAX_HOPS: usize = 40;
const OPAQUE: &[u8] = b".wh..wh..opq";
const WHITEOUT: &[u8] = b".wh.";

pub type Name = Vec<u8>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits, including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub xattrs: Vec<(Name, Vec<u8>)>,
}

impl Meta {
    fn implicit_dir() -> Meta {
        Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
        }
    }
}

/// Where a regular file's bytes are: in the unpacked tar of `layer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Content {
    pub layer: usize,
    pub offset: u64,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Dir(BTreeMap<Name, Node>),
    File(Content),
    Symlink(Name),
    /// A hard link to the file at `target` (a resolved path), which had
    /// `content` when the link was made.
    Hardlink {
        target: Vec<Name>,
        content: Content,
    },
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub meta: Meta,
    pub kind: Kind,
}

/// Counts of what the final tree holds (sizes the image).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub entries: u64,
    pub bytes: u64,
}

pub struct Tree {
    root: Node,
    /// The unpacked (plain tar) layers, by index.
    layers: Vec<PathBuf>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

/// Splits a tar path into components; `.` and empty ones dropped, `..`
/// kept (resolved against the tree later).
pub fn components(path: &[u8]) -> Vec<Name> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
        .collect()
}

impl Tree {
    pub fn new() -> Tree {
        Tree {
            root: Node {
                meta: Meta::implicit_dir(),
                kind: Kind::Dir(BTreeMap::new()),
            },
            layers: Vec::new(),
        }
    }

    pub fn root(&self) -> &Node {
        &self.root
    }

    pub fn layer_path(&self, layer: usize) -> &Path {
        &self.layers[layer]
    }

    /// The node at a resolved path.
    pub fn get(&self, path: &[Name]) -> Option<&Node> {
        let mut n = &self.root;
        for c in path {
            match &n.kind {
                Kind::Dir(children) => n = children.get(c)?,
                _ => return None,
            }
        }
        Some(n)
    }

    /// Resolves `path` inside the image: every component through symlinks
    /// (but the last when `follow_last` is false); components that do not
    /// exist yet are kept as they are.
    pub fn resolve(&self, path: &[Name], follow_last: bool) -> Vec<Name> {
        let mut out: Vec<Name> = Vec::new();
        let mut todo: VecDeque<Name> = path.iter().cloned().collect();
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            if c == b".." {
                out.pop();
                continue;
            }
            out.push(c);
            if todo.is_empty() && !follow_last {
                break;
            }
            if let Some(Node {
                kind: Kind::Symlink(target),
                ..
            }) = self.get(&out)
            {
                if hops == MAX_HOPS {
                    // A loop: the component is taken as it is (and, if a
                    // directory is needed there, replaced by one).
                    continue;
                }
                hops += 1;
                out.pop();
                if target.starts_with(b"/") {
                    out.clear();
                }
                let mut next: VecDeque<Name> = components(target).into();
                next.extend(todo);
                todo = next;
            }
        }
        out
    }

    /// The children of the directory at a resolved path, made (as plain
    /// root-owned directories) where missing; anything else in the way is
    /// replaced, as an upper layer's directory replaces a lower file.
    fn dir_mut(&mut self, path: &[Name]) -> &mut BTreeMap<Name, Node> {
        let mut n = &mut self.root;
        for c in path {
            let Kind::Dir(children) = &mut n.kind else {
                unreachable!("every node on the way is made a directory")
            };
            let child = children.entry(c.clone()).or_insert_with(|| Node {
                meta: Meta::implicit_dir(),
                kind: Kind::Dir(BTreeMap::new()),
            });
            if !matches!(child.kind, Kind::Dir(_)) {
                *child = Node {
                    meta: Meta::implicit_dir(),
                    kind: Kind::Dir(BTreeMap::new()),
                };
            }
            n = child;
        }
        match &mut n.kind {
            Kind::Dir(children) => children,
            _ => unreachable!("made a directory above"),
        }
    }

    /// Removes what is at `path` (resolved, last component not followed).
    fn remove(&mut self, path: &[Name]) {
        let Some((name, parent)) = path.split_last() else {
            return;
        };
        let parent = self.resolve(parent, true);
        if let Some(Node {
            kind: Kind::Dir(_), ..
        }) = self.get(&parent)
        {
            self.dir_mut(&parent).remove(name);
        }
    }

    /// Empties the directory at `path`: an opaque whiteout hides all a
    /// lower layer had there.
    fn make_opaque(&mut self, path: &[Name]) {
        let dir = self.resolve(path, true);
        if let Some(Node {
            kind: Kind::Dir(_), ..
        }) = self.get(&dir)
        {
            self.dir_mut(&dir).clear();
        }
    }

    /// Puts `node` at `path`. A directory over a directory keeps the
    /// children and takes the new metadata; anything else replaces.
    pub fn insert(&mut self, path: &[Name], node: Node) {
        let Some((name, parent)) = path.split_last() else {
            // The root itself: only its metadata can change.
            if matches!(node.kind, Kind::Dir(_)) {
                self.root.meta = node.meta;
            }
            return;
        };
        let parent = self.resolve(parent, true);
        let dir = self.dir_mut(&parent);
        match (dir.get_mut(name), node.kind) {
            (
                Some(Node {
                    meta,
                    kind: Kind::Dir(_),
                }),
                Kind::Dir(_),
            ) => *meta = node.meta,
            (_, kind) => {
                dir.insert(
                    name.clone(),
                    Node {
                        meta: node.meta,
                        kind,
                    },
                );
            }
        }
    }

    /// Makes sure a directory exists at a top-level `name` (the guest
    /// mounts over /proc, /sys, /dev, /run, /tmp; images made `FROM
    /// scratch` may lack them).
    pub fn ensure_dir(&mut self, name: &str, mode: u32) {
        let path = vec![name.as_bytes().to_vec()];
        if !matches!(self.get(&path).map(|n| &n.kind), Some(Kind::Dir(_))) {
            self.insert(
                &path,
                Node {
                    meta: Meta {
                        mode,
                        ..Meta::implicit_dir()
                    },
                    kind: Kind::Dir(BTreeMap::new()),
                },
            );
        }
    }

    /// Applies an unpacked (plain tar) layer on top of the tree. Its
    /// whiteouts apply to the layers below it only, so they are taken
    /// first, then its entries.
    pub fn apply_layer(&mut self, tar_path: &Path) -> Result<()> {
        let layer = self.layers.len();
        self.layers.push(tar_path.to_path_buf());
        let what = format!("reading layer {}", layer + 1);
        let open = || -> Result<tar::Archive<BufReader<File>>> {
            let f = File::open(tar_path).map_err(io(format!("opening {}", tar_path.display())))?;
            Ok(tar::Archive::new(BufReader::new(f)))
        };
        let mut ar = open()?;
        for e in ar.entries().map_err(io(what.clone()))? {
            let e = e.map_err(io(what.clone()))?;
            let path = components(&e.path_bytes());
            let Some((name, parent)) = path.split_last() else {
                continue;
            };
            if name.as_slice() == OPAQUE {
                self.make_opaque(parent);
            } else if let Some(hidden) = name.strip_prefix(WHITEOUT) {
                let mut p = parent.to_vec();
                p.push(hidden.to_vec());
                self.remove(&p);
            }
        }
        let mut ar = open()?;
        for e in ar.entries().map_err(io(what.clone()))? {
            let mut e = e.map_err(io(what.clone()))?;
            let path = components(&e.path_bytes());
            if path.last().is_some_and(|n| n.starts_with(WHITEOUT)) {
                continue;
            }
            let Some(node) = self.node_for(layer, &mut e, &path)? else {
                continue;
            };
            self.insert(&path, node);
        }
        Ok(())
    }

    fn node_for<R: std::io::Read>(
        &self,
        layer: usize,
        e: &mut tar::Entry<'_, R>,
        path: &[Name],
    ) -> Result<Option<Node>> {
        let h = e.header();
        let bad = |what: &str| {
            Error::Invalid(format!(
                "{what} of {}",
                String::from_utf8_lossy(&path.join(&b'/'))
            ))
        };
        // An empty numeric field (some tar writers leave them blank) reads
        // as 0, as GNU tar takes it; only a value too large is refused.
        let num = |r: std::io::Result<u64>| r.unwrap_or(0);
        let id = |v: u64, what: &str| u32::try_from(v).map_err(|_| bad(what));
        let mut meta = Meta {
            mode: h.mode().unwrap_or(0o644) & 0o7777,
            uid: id(num(h.uid()), "owner")?,
            gid: id(num(h.gid()), "group")?,
            mtime: num(h.mtime()),
            xattrs: Vec::new(),
        };
        let device = |e: &tar::Entry<'_, R>| -> Result<(u32, u32)> {
            let h = e.header();
            let major = h.device_major().ok().flatten().unwrap_or(0);
            let minor = h.device_minor().ok().flatten().unwrap_or(0);
            Ok((major, minor))
        };
        let kind = match h.entry_type() {
            tar::EntryType::Directory => Kind::Dir(BTreeMap::new()),
            tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File(Content {
                layer,
                offset: e.raw_file_position(),
                size: e.size(),
            }),
            tar::EntryType::Symlink => {
                Kind::Symlink(e.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default())
            }
            tar::EntryType::Link => {
                let target = components(&e.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default());
                let resolved = self.resolve(&target, false);
                match self.get(&resolved) {
                    Some(Node {
                        kind: Kind::File(content),
                        meta: target_meta,
                    }) => {
                        meta = target_meta.clone();
                        Kind::Hardlink {
                            target: resolved,
                            content: *content,
                        }
                    }
                    Some(Node {
                        kind: Kind::Hardlink { target, content },
                        meta: target_meta,
                    }) => {
                        meta = target_meta.clone();
                        Kind::Hardlink {
                            target: target.clone(),
                            content: *content,
                        }
                    }
                    _ => {
                        tracing::warn!(
                            path = %String::from_utf8_lossy(&path.join(&b'/')),
                            "skipping a hard link to a file the image does not have"
                        );
                        return Ok(None);
                    }
                }
            }
            tar::EntryType::Char => {
                let (a, b) = device(e)?;
                Kind::Char(a, b)
            }
            tar::EntryType::Block => {
                let (a, b) = device(e)?;
                Kind::Block(a, b)
            }
            tar::EntryType::Fifo => Kind::Fifo,
            tar::EntryType::GNUSparse => {
                return Err(Error::Unsupported(format!(
                    "sparse file {} in a layer",
                    String::from_utf8_lossy(&path.join(&b'/'))
                )))
            }
            // PAX and GNU long-name headers are folded in by `tar`; other
            // kinds carry nothing for a root filesystem.
            _ => return Ok(None),
        };
        if !matches!(kind, Kind::Hardlink { .. }) {
            if let Ok(Some(exts)) = e.pax_extensions() {
                for ext in exts.flatten() {
                    if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                        meta.xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                    }
                }
            }
        }
        Ok(Some(Node { meta, kind }))
    }

    /// What the tree holds: entries and file bytes (hard links counted once).
    pub fn totals(&self) -> Totals {
        fn walk(n: &Node, t: &mut Totals) {
            t.entries += 1;
            match &n.kind {
                Kind::Dir(children) => children.values().for_each(|c| walk(c, t)),
                Kind::File(c) => t.bytes += c.size,
                _ => {}
            }
        }
        let mut t = Totals::default();
        walk(&self.root, &mut t);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<Name> {
        components(s.as_bytes())
    }

    fn file(layer: usize) -> Node {
        Node {
            meta: Meta::implicit_dir(),
            kind: Kind::File(Content {
                layer,
                offset: 0,
                size: 1,
            }),
        }
    }

    fn link(target: &str) -> Node {
        Node {
            meta: Meta::implicit_dir(),
            kind: Kind::Symlink(target.as_bytes().to_vec()),
        }
    }

    #[test]
    fn symlinked_parents_resolve_inside_the_image() {
        let mut t = Tree::new();
        t.insert(&p("usr/bin/x"), file(0));
        t.insert(&p("bin"), link("usr/bin"));
        t.insert(&p("etc"), link("/../../host-etc"));
        // A later entry under a symlinked directory lands in its target,
        // inside the image; an absolute target starts at the image's root.
        t.insert(&p("bin/y"), file(1));
        t.insert(&p("etc/passwd"), file(1));
        assert!(t.get(&p("usr/bin/y")).is_some());
        assert!(t.get(&p("host-etc/passwd")).is_some());
        assert_eq!(t.resolve(&p("../../bin/x"), true), p("usr/bin/x"));
        // The last component is not followed: the symlink is replaced.
        t.insert(&p("bin"), file(2));
        assert!(matches!(t.get(&p("bin")).unwrap().kind, Kind::File(_)));
        assert!(t.get(&p("usr/bin/x")).is_some());
    }

    #[test]
    fn symlink_loops_end() {
        let mut t = Tree::new();
        t.insert(&p("a"), link("b"));
        t.insert(&p("b"), link("a"));
        t.insert(&p("a/x"), file(0));
        assert!(t.totals().entries >= 3);
    }

    #[test]
    fn a_directory_over_a_directory_keeps_its_children() {
        let mut t = Tree::new();
        t.insert(&p("d/f"), file(0));
        let mut meta = Meta::implicit_dir();
        meta.mode = 0o700;
        t.insert(
            &p("d"),
            Node {
                meta,
                kind: Kind::Dir(BTreeMap::new()),
            },
        );
        assert!(t.get(&p("d/f")).is_some());
        assert_eq!(t.get(&p("d")).unwrap().meta.mode, 0o700);
    }
}
