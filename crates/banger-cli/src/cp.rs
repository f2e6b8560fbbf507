//! `banger vm cp SRC DST`: one side is `NAME:PATH` in a running VM, the
//! other a host path.

use crate::output::{escape, print};
use anyhow::{bail, Result};
use banger_proto::methods::daemon as d;
use banger_proto::Client;

/// Where guest paths that are not absolute start.
const GUEST_HOME: &str = "/root";

/// `NAME:PATH` if `arg` names a guest path (a valid VM name before the
/// first `:`, and no `/` before it), else `None` (a host path).
fn guest_side(arg: &str) -> Option<(String, String)> {
    let (name, path) = arg.split_once(':')?;
    if name.contains('/') || banger_proto::names::validate_vm_name(name).is_err() {
        return None;
    }
    let path = if path.starts_with('/') {
        path.to_string()
    } else if path.is_empty() {
        GUEST_HOME.to_string()
    } else {
        format!("{GUEST_HOME}/{path}")
    };
    Some((name.to_string(), path))
}

/// The request for `src` → `dst`, or why they cannot be copied.
pub fn request(src: &str, dst: &str) -> Result<d::VmCopy> {
    let absolute = |p: &str| -> Result<String> { Ok(std::path::absolute(p)?.display().to_string()) };
    match (guest_side(src), guest_side(dst)) {
        (Some(_), Some(_)) => bail!("one side must be a host path (guest to guest is not supported)"),
        (None, None) => bail!("one side must be NAME:PATH in a VM"),
        (None, Some((name, guest))) => Ok(d::VmCopy {
            name,
            to_guest: true,
            host: absolute(src)?,
            guest,
        }),
        (Some((name, guest)), None) => Ok(d::VmCopy {
            name,
            to_guest: false,
            host: absolute(dst)?,
            guest,
        }),
    }
}

pub async fn cp(c: &Client, src: &str, dst: &str, json: bool) -> Result<i32> {
    let req = request(src, dst)?;
    let copied = c
        .call_with_events::<d::VmCopyM>(&req, None, |p: d::Progress| {
            eprintln!("  [{:>6.1}s] {}", p.elapsed_ms as f64 / 1000.0, escape(&p.stage));
        })
        .await?;
    print(json, &copied, |c| {
        println!("copied {} entries ({} KiB)", c.entries, c.bytes.div_ceil(1024));
    });
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_side_is_name_colon_path() {
        assert_eq!(
            guest_side("web:/etc/hosts"),
            Some(("web".into(), "/etc/hosts".into()))
        );
        assert_eq!(
            guest_side("web:repo/out"),
            Some(("web".into(), "/root/repo/out".into()))
        );
        assert_eq!(guest_side("web:"), Some(("web".into(), "/root".into())));
        // Host paths, even with a colon in them.
        assert_eq!(guest_side("./a:b"), None);
        assert_eq!(guest_side("/tmp/x:y"), None);
        assert_eq!(guest_side("plain"), None);
        assert_eq!(guest_side("Bad Name:/x"), None);
    }

    #[test]
    fn exactly_one_side_is_a_guest() {
        assert!(request("a:/x", "b:/y").is_err());
        assert!(request("/x", "/y").is_err());
        let r = request("/tmp/f", "web:/root/").unwrap();
        assert!(r.to_guest && r.host == "/tmp/f" && r.guest == "/root/");
        let r = request("web:/var/log", "/tmp/out").unwrap();
        assert!(!r.to_guest && r.host == "/tmp/out" && r.guest == "/var/log");
    }
}
