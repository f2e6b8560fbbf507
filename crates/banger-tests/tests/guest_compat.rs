//! The guest is a normal Linux box: a script run in a fresh guest checks
//! what a distribution's init provides and what build tools and test
//! suites rely on. Each failed check prints its name.

use banger_tests::Env;

/// One line per check: `ok NAME` or `FAIL NAME`. Runs under bash (the
/// default image's shell with process substitution).
const CHECKS: &str = r##"
check() { name=$1; shift; if "$@" >/dev/null 2>&1; then echo "ok $name"; else echo "FAIL $name"; fi; }
check process-substitution bash -c 'test "$(cat <(echo hi))" = hi'
check dev-fd test -e /dev/fd/0
check dev-stdin test -L /dev/stdin
check dev-stdout test -L /dev/stdout
check dev-stderr test -L /dev/stderr
check dev-shm-tmpfs sh -c 'grep -q " /dev/shm tmpfs " /proc/mounts && test "$(stat -c %a /dev/shm)" = 1777'
check dev-pts sh -c 'grep -q " /dev/pts devpts " /proc/mounts'
check dev-mqueue sh -c 'grep -q " /dev/mqueue mqueue " /proc/mounts'
check run-tmpfs sh -c 'grep -q " /run tmpfs " /proc/mounts && test "$(stat -c %a /run)" = 755'
check cgroup2 sh -c 'grep -q " /sys/fs/cgroup cgroup2 " /proc/mounts && test -e /sys/fs/cgroup/cgroup.controllers'
check nofile sh -c 'test "$(ulimit -n)" -ge 1048576'
check etc-hosts grep -q "$(hostname)" /etc/hosts
check resolve-own-name getent hosts "$(hostname)"
check utf8-locale sh -c 'case "$LANG" in *UTF-8*) true;; *) false;; esac'
check inotify-watches sh -c 'test "$(cat /proc/sys/fs/inotify/max_user_watches)" -ge 524288'
check unprivileged-ping sh -c 'test "$(cat /proc/sys/net/ipv4/ping_group_range | tr -s "\t " " ")" = "0 2147483647"'
check userns-sandbox unshare --user --pid --mount --fork --map-root-user true
check clock sh -c 'test "$(date +%s)" -ge "$HOST_EPOCH"'
check entropy sh -c 'test "$(cat /proc/sys/kernel/random/entropy_avail)" -ge 128'
check cc-build-and-run sh -c 'printf "#include <stdio.h>\nint main(void){puts(\"hi\");return 0;}\n" > /tmp/t.c && cc -O2 -o /tmp/t /tmp/t.c && test "$(/tmp/t)" = hi'
check make sh -c 'printf "all:\n\t@echo made\n" > /tmp/Makefile && test "$(make -s -C /tmp)" = made'
check python-venv sh -c 'python3 -m venv /tmp/venv && /tmp/venv/bin/python -c "import sys; print(sys.prefix)" | grep -q /tmp/venv && /tmp/venv/bin/pip --version'
check ping-gateway sh -c 'ping -c1 -W5 "$(ip route | awk "/default/ {print \$3}")"'
check unprivileged-ping-as-nobody su -s /bin/sh nobody -c 'ping -c1 -W5 127.0.0.1'
check dev-tools sh -c 'for t in curl jq git sudo less unzip xz file patch wget; do command -v $t || exit 1; done'
sh -c 'sleep 0.2 & exit 0'; sleep 1
check zombies-reaped sh -c '! grep -qs "^State:.*Z" /proc/[0-9]*/status'
"##;

#[test]
fn a_fresh_guest_has_what_a_distribution_gives() {
    let env = Env::with_image();
    env.create_small("compat", &[]);
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 5;
    let script = format!("export HOST_EPOCH={epoch}\n{CHECKS}");
    let out = env.banger_ok(&["vm", "exec", "compat", "--", "bash", "-c", &script]);
    let failed: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
    let passed = out.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(failed.is_empty(), "guest-compat failures: {failed:?}\n{out}");
    assert_eq!(passed, CHECKS.matches("\ncheck ").count(), "{out}");
    env.banger_ok(&["vm", "delete", "compat"]);
}

/// The host seeds each guest as it comes up: its clock (Firecracker has no
/// RTC; a resumed guest's clock stood still) and its entropy pool. The
/// daemon logs what the agent did with them, under the create's op id.
#[test]
fn a_guest_gets_the_hosts_clock_and_entropy_at_boot() {
    let env = Env::with_image();
    let out = env.banger(&[
        "vm",
        "create",
        "--name",
        "seeded",
        "--vcpus",
        "1",
        "--memory",
        "512",
        "--disk-size",
        "128",
    ]);
    let created = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{created}");
    let op = created
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '-')
        .find(|w| w.starts_with("op-"))
        .unwrap_or_else(|| panic!("no op id in {created:?}"))
        .to_string();
    let seeded: Vec<_> = env
        .daemon_records()
        .into_iter()
        .filter(|r| r["message"] == "guest clock and entropy seeded")
        .collect();
    assert_eq!(seeded.len(), 1, "{seeded:?}");
    assert_eq!(seeded[0]["op_id"], op.as_str(), "{seeded:?}");
    assert_eq!(seeded[0]["entropy_bytes"], 64, "{seeded:?}");
    // The guest's clock agrees with the host's to within a second (the
    // time an exec takes under emulation is measured and allowed for).
    let before = std::time::SystemTime::now();
    let out = env.banger_ok(&["vm", "exec", "seeded", "--", "date", "+%s.%N"]);
    let after = std::time::SystemTime::now();
    let guest: f64 = out.trim().parse().unwrap_or_else(|_| panic!("{out:?}"));
    let secs = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(
        guest >= secs(before) - 1.0 && guest <= secs(after) + 1.0,
        "guest clock {guest} outside host [{}, {}]",
        secs(before),
        secs(after)
    );
    env.banger_ok(&["vm", "delete", "seeded"]);
}
