//! `vm cp` both ways on a real guest: a directory with a symlink, an
//! executable and a 20 MiB file makes the round trip identical; copying
//! into an existing directory puts the entry inside it; a missing source
//! is a clear error that writes nothing.

use banger_tests::Env;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Every entry under `root`: type, permission bits, and content or link target.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {:o}", m.permissions().mode() & 0o7777)
            } else {
                let bytes = std::fs::read(&p).unwrap();
                let sum: u64 = bytes
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (i as u64 + 1) * u64::from(*b))
                    .sum();
                format!("file {:o} {} {sum}", m.permissions().mode() & 0o7777, bytes.len())
            };
            out.insert(rel, what);
        }
    }
    out
}

#[test]
fn a_directory_makes_the_round_trip_unchanged() {
    let env = Env::with_image();
    env.create_small("cpvm", &[]);
    let host = env.home().join("cp");
    let src = host.join("src");
    std::fs::create_dir_all(src.join("sub/empty")).unwrap();
    std::fs::write(src.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(src.join("sub/note.txt"), "a note\n").unwrap();
    std::fs::set_permissions(src.join("sub/note.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("sub/note.txt", src.join("link")).unwrap();
    let mut big = vec![0u8; 20 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(src.join("big.bin"), &big).unwrap();

    // In: /root/in does not exist, so the directory becomes it.
    env.banger_ok(&["vm", "cp", src.to_str().unwrap(), "cpvm:/root/in"]);
    let seen = env.banger_ok(&[
        "vm",
        "exec",
        "cpvm",
        "--",
        "sh",
        "-c",
        "cd /root/in && ./run.sh && stat -c '%a %s' run.sh big.bin sub/note.txt && readlink link && cat link",
    ]);
    assert_eq!(
        seen.lines().collect::<Vec<_>>(),
        ["ran", "755 19", "644 20971520", "600 7", "sub/note.txt", "a note"],
        "{seen}"
    );

    // Out again: identical tree.
    let back = host.join("back");
    env.banger_ok(&["vm", "cp", "cpvm:/root/in", back.to_str().unwrap()]);
    assert_eq!(tree(&back), tree(&src));

    // Into an existing directory, the entry lands inside it.
    env.banger_ok(&["vm", "cp", src.join("run.sh").to_str().unwrap(), "cpvm:/tmp"]);
    assert_eq!(
        env.banger_ok(&["vm", "exec", "cpvm", "--", "/tmp/run.sh"]),
        "ran\n"
    );
    let into = host.join("into");
    std::fs::create_dir(&into).unwrap();
    env.banger_ok(&["vm", "cp", "cpvm:/tmp/run.sh", into.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(into.join("run.sh")).unwrap(),
        "#!/bin/sh\necho ran\n"
    );

    // A missing source: a clear error with its op id, nothing written.
    let missing = env.banger(&[
        "vm",
        "cp",
        "cpvm:/no/such/path",
        host.join("nothing").to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("op-") && err.contains("/no/such/path"), "{err}");
    assert!(!host.join("nothing").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&host)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".banger-cp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary directories left: {leftovers:?}");
    env.banger_ok(&["vm", "delete", "cpvm"]);
}
