//! Workspaces on real guests: what is copied, what is refused before a VM
//! exists, and export of guest-side changes as a patch the host applies.

use banger_tests::Env;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// tracked.txt and a .gitignore committed; untracked.txt and ignored.txt not.
fn fixture_repo(env: &Env) -> PathBuf {
    let repo = env.dir.path().join("repo");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    git(&repo, &["init", "-q"]);
    std::fs::write(repo.join("tracked.txt"), "tracked\n").unwrap();
    std::fs::write(repo.join("src/lib.txt"), "line 1\nline 2\n").unwrap();
    std::fs::write(repo.join(".gitignore"), "ignored.txt\n").unwrap();
    std::fs::write(repo.join("binary.bin"), [0u8, 159, 146, 150, 255, 0, 1]).unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "base"]);
    std::fs::write(repo.join("untracked.txt"), "untracked\n").unwrap();
    std::fs::write(repo.join("ignored.txt"), "secret\n").unwrap();
    repo
}

fn vm_count(env: &Env) -> usize {
    let v: Value = serde_json::from_str(&env.banger_ok(&["vm", "list", "--json"])).unwrap();
    v.as_array().unwrap().len()
}

#[test]
fn only_tracked_files_are_copied_and_the_command_status_comes_back() {
    let env = Env::with_image();
    let repo = fixture_repo(&env);
    let r = repo.to_str().unwrap();
    let out = env.banger(&[
        "vm",
        "run",
        r,
        "--rm",
        "--",
        "sh",
        "-c",
        "test -f tracked.txt && test ! -f untracked.txt && exit 3",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("untracked.txt") && stderr.contains("--include-untracked"),
        "no notice: {stderr}"
    );
    assert!(
        !stderr.contains("ignored.txt"),
        "ignored files are never mentioned: {stderr}"
    );

    // --include-untracked copies the untracked file and never the ignored one.
    let out = env.banger(&[
        "vm",
        "run",
        r,
        "--rm",
        "--include-untracked",
        "--",
        "sh",
        "-c",
        "test -f untracked.txt && test ! -f ignored.txt && test -f src/lib.txt && pwd",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "/root/repo");
    assert_eq!(vm_count(&env), 0, "--rm left a VM");
    assert!(env.vm_processes().is_empty());

    // A signal-killed command maps to 128 + N.
    let out = env.banger(&["vm", "run", r, "--rm", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15));
}

#[test]
fn guest_changes_export_as_a_patch_that_applies_on_a_clean_checkout() {
    let env = Env::with_image();
    let repo = fixture_repo(&env);
    env.banger_ok(&[
        "vm",
        "run",
        repo.to_str().unwrap(),
        "-d",
        "--name",
        "ws",
        "--branch",
        "feature",
    ]);
    assert_eq!(
        env.banger_ok(&["vm", "exec", "ws", "--", "pwd"]).trim(),
        "/root/repo"
    );
    assert_eq!(
        env.banger_ok(&["vm", "exec", "ws", "--", "git", "branch", "--show-current"])
            .trim(),
        "feature"
    );
    // A guest commit, then an unstaged edit and a new file on top.
    env.banger_ok(&[
        "vm", "exec", "ws", "--", "sh", "-c",
        "git -c user.name=g -c user.email=g@vm commit -q -am x --allow-empty && \
         echo committed >> src/lib.txt && git -c user.name=g -c user.email=g@vm commit -q -am 'guest commit' && \
         echo edited >> tracked.txt && printf 'brand new\\n' > new.txt && printf '\\000\\001\\002' > new.bin",
    ]);
    let status_before = env.banger_ok(&["vm", "exec", "ws", "--", "git", "status", "--porcelain"]);
    let patch = env.dir.path().join("ws.patch");
    env.banger_ok(&[
        "vm",
        "workspace",
        "export",
        "ws",
        "--output",
        patch.to_str().unwrap(),
    ]);
    // Export left the guest's own index alone.
    assert_eq!(
        env.banger_ok(&["vm", "exec", "ws", "--", "git", "status", "--porcelain"]),
        status_before
    );

    let clean = env.dir.path().join("clean");
    Command::new("git")
        .args(["clone", "-q"])
        .arg(&repo)
        .arg(&clean)
        .status()
        .unwrap();
    git(&clean, &["apply", patch.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(clean.join("tracked.txt")).unwrap(),
        "tracked\nedited\n"
    );
    assert_eq!(
        std::fs::read_to_string(clean.join("src/lib.txt")).unwrap(),
        "line 1\nline 2\ncommitted\n"
    );
    assert_eq!(
        std::fs::read_to_string(clean.join("new.txt")).unwrap(),
        "brand new\n"
    );
    assert_eq!(std::fs::read(clean.join("new.bin")).unwrap(), [0, 1, 2]);

    // A guest that plants a symlink to a host path: named, and not written
    // without --allow-symlinks.
    env.banger_ok(&["vm", "exec", "ws", "--", "ln", "-s", "/etc/passwd", "evil"]);
    let planted = env.dir.path().join("evil.patch");
    let out = env.banger(&[
        "vm",
        "workspace",
        "export",
        "ws",
        "--output",
        planted.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a symlink patch was written: {stderr}");
    assert!(stderr.contains("symlink evil -> /etc/passwd"), "{stderr}");
    assert!(!planted.exists(), "written anyway");
    env.banger_ok(&[
        "vm",
        "workspace",
        "export",
        "ws",
        "--output",
        planted.to_str().unwrap(),
        "--allow-symlinks",
    ]);
    assert!(planted.exists());
    env.banger_ok(&["vm", "delete", "ws"]);
}

#[test]
fn bad_workspaces_and_flag_combinations_are_refused_before_a_vm_exists() {
    let env = Env::with_image();
    let repo = fixture_repo(&env);
    let r = repo.to_str().unwrap();
    let refused = |args: &[&str], text: &str| {
        let out = env.banger(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(text), "{args:?}: {stderr}");
        assert_eq!(vm_count(&env), 0, "{args:?} created a VM");
    };
    let outside = env.dir.path().join("not-a-repo");
    std::fs::create_dir_all(&outside).unwrap();
    refused(
        &["vm", "run", outside.to_str().unwrap(), "--", "true"],
        "not inside a git repository",
    );

    let sub = env.dir.path().join("with-submodule");
    std::fs::create_dir_all(&sub).unwrap();
    git(&sub, &["init", "-q"]);
    git(
        &sub,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            r,
            "dep",
        ],
    );
    refused(&["vm", "run", sub.to_str().unwrap(), "--", "true"], "submodules");

    refused(&["vm", "run", r, "-d", "--rm"], "cannot be combined");
    refused(&["vm", "run", r, "-d", "--", "true"], "runs no command");

    std::fs::write(repo.join(".mise.toml"), "[tools]\n").unwrap();
    git(&repo, &["add", ".mise.toml"]);
    refused(&["vm", "run", r, "--", "true"], "--nat");

    // --dry-run lists what would be copied and creates nothing.
    let out = env.banger_ok(&["vm", "run", r, "--dry-run"]);
    assert!(
        out.lines().any(|l| l == "tracked.txt") && out.lines().any(|l| l == ".mise.toml"),
        "{out}"
    );
    assert!(
        !out.contains("untracked.txt") && !out.contains("ignored.txt"),
        "{out}"
    );
    assert_eq!(vm_count(&env), 0);
}

/// A patch far larger than the guest's vsock credit window (256 KiB) comes
/// back whole: the export used to stop at ~170 KB and hang.
#[test]
fn a_ten_mebibyte_patch_exports_whole() {
    let env = Env::with_image();
    let repo = fixture_repo(&env);
    env.banger_ok(&[
        "vm",
        "run",
        repo.to_str().unwrap(),
        "-d",
        "--name",
        "big",
        "--vcpus",
        "1",
        "--memory",
        "512",
        "--disk-size",
        "256",
    ]);
    // ~10 MiB of text lines, so the patch itself is ~10 MiB.
    let guest_sum = env.banger_ok(&[
        "vm",
        "exec",
        "big",
        "--",
        "sh",
        "-c",
        "head -c 7800000 /dev/urandom | base64 > big.txt && sha256sum big.txt | cut -d' ' -f1",
    ]);
    let patch = env.dir.path().join("big.patch");
    env.banger_ok(&[
        "vm",
        "workspace",
        "export",
        "big",
        "--output",
        patch.to_str().unwrap(),
    ]);
    let size = std::fs::metadata(&patch).unwrap().len();
    assert!(size > 10_000_000, "the patch is only {size} bytes");
    let clean = env.dir.path().join("clean");
    Command::new("git")
        .args(["clone", "-q"])
        .arg(&repo)
        .arg(&clean)
        .status()
        .unwrap();
    git(&clean, &["apply", patch.to_str().unwrap()]);
    let host_sum = Command::new("sha256sum")
        .arg(clean.join("big.txt"))
        .output()
        .unwrap();
    let host_sum = String::from_utf8_lossy(&host_sum.stdout);
    assert_eq!(host_sum.split_whitespace().next(), Some(guest_sum.trim()));
    env.banger_ok(&["vm", "delete", "big"]);
}
