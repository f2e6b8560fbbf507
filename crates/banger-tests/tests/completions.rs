//! Shell completion with live names, and man pages from the clap
//! definitions. A completion asks the running daemon (VMs, images,
//! sessions' names); with no daemon it completes commands only, at once,
//! and starts nothing.

use banger_tests::Env;
use std::time::{Duration, Instant};

/// What fish would get for the command line `words` (the last is the word
/// being completed), one `value\thelp` per line.
fn complete(env: &Env, words: &[&str]) -> String {
    let out = env
        .cmd("banger")
        .env("COMPLETE", "fish")
        .arg("--")
        .arg("banger")
        .args(words)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_offer_live_names_and_never_start_a_daemon() {
    let env = Env::with_image();
    env.banger_ok(&["vm", "create", "--no-start", "--name", "alpha-one"]);
    env.banger_ok(&["vm", "create", "--no-start", "--name", "alpha-two"]);

    let vms = complete(&env, &["vm", "start", "alpha"]);
    let names: Vec<&str> = vms.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(names, ["alpha-one", "alpha-two"], "{vms}");
    assert!(vms.contains("stopped VM"), "no state shown: {vms}");
    assert!(complete(&env, &["vm", "session", "list", "alp"]).contains("alpha-one"));
    assert!(complete(&env, &["image", "show", ""])
        .lines()
        .any(|l| l.starts_with("default\t")));
    assert!(complete(&env, &["vm", "run", "--image", "def"]).starts_with("default"));
    // Commands and flags still come from clap.
    assert!(complete(&env, &["vm", "exe"]).starts_with("exec"));

    // No daemon: commands complete, names do not, quickly, and no daemon
    // is started for it.
    env.banger_ok(&["daemon", "stop"]);
    let t = Instant::now();
    assert_eq!(complete(&env, &["vm", "start", "alpha"]), "");
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert!(complete(&env, &["vm", "sta"]).contains("start"));
    let status = env.banger(&["daemon", "status"]);
    assert_eq!(status.status.code(), Some(3), "a completion started the daemon");

    // The registration names this binary for the shell to ask.
    let reg = env.banger_ok(&["completions", "bash"]);
    assert!(
        reg.contains("COMPLETE=\"bash\"") || reg.contains("COMPLETE=bash"),
        "{reg}"
    );
    assert!(!env.banger(&["completions", "nosuchshell"]).status.success());
}

#[test]
fn man_pages_cover_every_command() {
    let env = Env::without_helper();
    let dir = env.dir.path().join("man");
    env.banger_ok(&["man", "-o", dir.to_str().unwrap()]);
    for page in [
        "banger.1",
        "banger-vm.1",
        "banger-vm-run.1",
        "banger-system-install.1",
        "banger-image-pull.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is not a man page"
        );
    }
    let run = std::fs::read_to_string(dir.join("banger-vm-run.1")).unwrap();
    assert!(
        run.contains("\\-\\-rm") || run.contains("--rm"),
        "vm run's page lacks --rm"
    );
    assert!(
        !dir.join("banger-help.1").exists(),
        "a page for clap's help subcommand"
    );
    let one = env.banger_ok(&["man"]);
    assert!(
        one.contains(".TH banger 1") || one.contains(".TH banger"),
        "{}",
        &one[..200.min(one.len())]
    );
}
