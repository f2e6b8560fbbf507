//! OCI and Docker images as root filesystems.
//!
//! An image is read from an OCI image layout (a directory), an OCI or
//! `docker save` archive, or a registry (`registry`, pulled into a layout
//! first). Its layers are unpacked into plain tar files (`source`), their
//! digests checked, then flattened in memory (`tree`) with whiteouts and
//! hard links honoured, and only the surviving files are written out into
//! a fresh directory (`write`) with their owners, modes, xattrs and times.
//!
//! Everything an image says is untrusted: paths are resolved inside the
//! image's own root (a symlink to `/etc` means the image's `/etc`), `..`
//! never leaves it, and nothing is ever written through a symlink.

mod error;
pub mod registry;
pub mod source;
pub mod tree;
pub mod write;

pub use error::Error;
pub use source::{open, Image};
pub use tree::Tree;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Unpacks every layer of `image` into `work` (one plain tar each) and
/// flattens them. `progress` hears one line per layer.
pub fn flatten(image: &Image, work: &std::path::Path, progress: &dyn Fn(&str)) -> Result<Tree> {
    let mut tree = Tree::new();
    for i in 0..image.layers.len() {
        let tar = work.join(format!("layer-{i}.tar"));
        let bytes = image.unpack_layer(i, &tar)?;
        progress(&format!(
            "layer {}/{}: {} MiB",
            i + 1,
            image.layers.len(),
            bytes >> 20
        ));
        tree.apply_layer(&tar)?;
    }
    // The guest mounts over these; an image made `FROM scratch` may lack them.
    for (dir, mode) in [
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("root", 0o700),
    ] {
        tree.ensure_dir(dir, mode);
    }
    Ok(tree)
}
