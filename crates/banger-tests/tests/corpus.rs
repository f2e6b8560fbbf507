//! The hostile corpus: hundreds of crafted requests against the root
//! helper (as root, as the uid it serves, as a foreign uid) and against the
//! daemon. Each must be refused with the expected code and an op id, and
//! none may change anything: links, addresses and nftables rules in the
//! helper's network namespace, VM rows and directories, images, kernels.
//! Both servers must still answer afterwards.

use banger_tests::{raw_exchange, Env};
use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One crafted request and the codes it may be refused with.
struct Case {
    label: String,
    frame: Vec<u8>,
    expect: &'static [&'static str],
}

const BAD: &[&str] = &["bad_request"];
const MISSING: &[&str] = &["not_found"];
const BAD_OR_MISSING: &[&str] = &["bad_request", "not_found"];
const DENIED: &[&str] = &["unauthorized"];
/// A call that gives uid 0 a link: root's reaches the missing bridge, the
/// owner's is refused first for naming another uid.
const MISSING_OR_DENIED: &[&str] = &["not_found", "unauthorized"];

fn case(label: impl Into<String>, method: &str, params: Value, expect: &'static [&'static str]) -> Case {
    let frame = json!({"version": 1, "method": method, "params": params});
    let mut frame = serde_json::to_vec(&frame).unwrap();
    frame.push(b'\n');
    Case {
        label: label.into(),
        frame,
        expect,
    }
}

fn raw(label: &str, bytes: &[u8], expect: &'static [&'static str]) -> Case {
    Case {
        label: label.into(),
        frame: bytes.to_vec(),
        expect,
    }
}

/// Names no banger object may have: empty, paths, shell and terminal
/// metacharacters, NUL, non-ASCII, overlong.
fn bad_names() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        " ",
        "a b",
        "../x",
        "x/../../etc",
        "/etc/passwd",
        "\u{1b}[31mred",
        "x\ny",
        "x\u{0}y",
        "ünïcödé",
        "-rf",
        "--help",
        "*",
        "$(reboot)",
        "`id`",
        "x;id",
        ".",
        "..",
        "a/b",
        "x\ty",
        "x\\y",
        "x'y",
        "x\"y",
        "{}",
        "%s%n",
        "\u{202e}evil",
        "x\r",
        "🙂",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("a".repeat(64));
    v.push("a".repeat(4096));
    v
}

/// Parameters of the wrong shape for a method taking `{field: string}`.
fn wrong_shapes(field: &str) -> Vec<Value> {
    vec![
        json!([]),
        json!("str"),
        json!(1),
        json!(true),
        json!({ field: 1 }),
        json!({ field: null }),
        json!({ field: ["a"] }),
        json!({ field: {"a": 1} }),
        json!({ field: -1.5 }),
        json!({}),
    ]
}

/// Envelope-level garbage, answered before any method runs.
fn envelope_cases(method: &str) -> Vec<Case> {
    let mut v = vec![
        raw("not json", b"{this is not json\n", BAD),
        raw("bare string", b"\"hello\"\n", BAD),
        raw("array", b"[1,2,3]\n", BAD),
        raw("number", b"42\n", BAD),
        raw("null", b"null\n", BAD),
        raw("bad utf-8", b"{\"version\":1,\"method\":\"\xff\xfe\"}\n", BAD),
        raw("truncated", b"{\"version\":1,\"method\":\n", BAD),
        raw(
            "deep nesting",
            format!("{}{}\n", "[".repeat(10_000), "]".repeat(10_000)).as_bytes(),
            BAD,
        ),
        raw("no method", b"{\"version\":1}\n", BAD),
        raw("method is a number", b"{\"version\":1,\"method\":7}\n", BAD),
    ];
    for version in ["0", "2", "-1", "\"1\"", "null", "1e9", "1.5"] {
        v.push(raw(
            &format!("version {version}"),
            format!("{{\"version\":{version},\"method\":\"{method}\"}}\n").as_bytes(),
            &["bad_version", "bad_request"],
        ));
    }
    for m in [
        "no.such",
        "",
        "PRIV.PING",
        "priv.",
        "priv.ping ",
        "priv.ping\u{0}",
        "../priv.ping",
        "vm.create.begin.x",
        "shutdown\n",
    ] {
        v.push(case(
            format!("unknown method {m:?}"),
            m,
            json!({}),
            &["unknown_method", "bad_request"],
        ));
    }
    v.push(case(
        "long unknown method",
        &"m".repeat(100_000),
        json!({}),
        &["unknown_method", "bad_request"],
    ));
    let mut huge = vec![b'x'; 1024 * 1024 + 100];
    huge.push(b'\n');
    v.push(raw("oversize frame", &huge, BAD));
    v
}

/// A MAC the helper accepts, for cases that aim at another field.
const GOOD_MAC: &str = "52:54:00:c0:7b:05";

/// `priv.guest.allow` params.
fn guest(vm: &str, tap: &str, mac: &str, ip: &str, bridge: &str) -> Value {
    json!({"vm": vm, "tap": tap, "bridge": bridge, "mac": mac, "ip": ip, "nat": true})
}

fn helper_cases() -> Vec<Case> {
    let mut v = envelope_cases("priv.ping");
    for name in bad_names() {
        v.push(case(
            format!("bridge {name:?}"),
            "priv.bridge.ensure",
            json!({"name": name}),
            BAD,
        ));
        v.push(case(
            format!("tap {name:?}"),
            "priv.tap.create",
            json!({"name": name}),
            BAD,
        ));
        v.push(case(
            format!("tap delete {name:?}"),
            "priv.tap.delete",
            json!({"name": name}),
            BAD,
        ));
        v.push(case(
            format!("tap open {name:?}"),
            "priv.tap.open",
            json!({"name": name}),
            BAD,
        ));
        v.push(case(
            format!("guest vm {name:?}"),
            "priv.guest.allow",
            guest(&name, "bgtcorpus", GOOD_MAC, "172.30.0.9", "banger0"),
            BAD,
        ));
        v.push(case(
            format!("guest tap {name:?}"),
            "priv.guest.allow",
            guest("corpusvm", &name, GOOD_MAC, "172.30.0.9", "banger0"),
            BAD,
        ));
        v.push(case(
            format!("guest revoke {name:?}"),
            "priv.guest.revoke",
            json!({"vm": name}),
            BAD,
        ));
        v.push(case(
            format!("netns vm {name:?}"),
            "priv.netns.ensure",
            json!({"vm": name, "tap": "bgtcorpus", "bridge": "banger0", "owner_uid": 0}),
            BAD,
        ));
        v.push(case(
            format!("netns tap {name:?}"),
            "priv.netns.ensure",
            json!({"vm": "corpusvm", "tap": name, "bridge": "banger0", "owner_uid": 0}),
            BAD,
        ));
        v.push(case(
            format!("netns delete {name:?}"),
            "priv.netns.delete",
            json!({"vm": name, "tap": "bgtcorpus"}),
            BAD,
        ));
        v.push(case(
            format!("pod net tap {name:?}"),
            "priv.podnet.ensure",
            json!({"netns": "/run/netns/corpus-missing", "tap": name, "owner_uid": 0}),
            BAD,
        ));
        v.push(case(
            format!("pod net delete tap {name:?}"),
            "priv.podnet.delete",
            json!({"netns": "/run/netns/corpus-missing", "tap": name}),
            BAD,
        ));
        v.push(case(
            format!("pod net namespace {name:?}"),
            "priv.podnet.ensure",
            json!({"netns": name, "tap": "bgtcorpus", "owner_uid": 0}),
            BAD,
        ));
    }
    // Namespaces that are not an engine's: the host's and the helper's
    // own (through /proc), banger's own, escapes from /run/netns, files
    // that are no namespace, and one that does not exist.
    for ns in [
        "/proc/1/ns/net",
        "/proc/self/ns/net",
        "/proc/thread-self/ns/net",
        "/run/netns/../../proc/1/ns/net",
        "/var/run/netns/../../proc/self/ns/net",
        "/run/netns",
        "/run/netns/",
        "/run/netns/.",
        "/run/netns/banger-corpusvm",
        "/etc/passwd",
        "/dev/null",
        "/run/netns/corpus-missing",
        "relative/netns",
    ] {
        v.push(case(
            format!("pod net in {ns:?}"),
            "priv.podnet.ensure",
            json!({"netns": ns, "tap": "bgtcorpus", "owner_uid": 0}),
            BAD,
        ));
        if ns != "/run/netns/corpus-missing" {
            v.push(case(
                format!("pod net delete in {ns:?}"),
                "priv.podnet.delete",
                json!({"netns": ns, "tap": "bgtcorpus"}),
                BAD,
            ));
        }
    }
    for other in ["eth0", "lo", "docker0", "virbr0", "br0", "veth0"] {
        v.push(case(
            format!("foreign bridge {other}"),
            "priv.bridge.ensure",
            json!({"name": other}),
            BAD,
        ));
        v.push(case(
            format!("tap on foreign bridge {other}"),
            "priv.tap.create",
            json!({"name": "bgtcorpus", "bridge": other}),
            BAD,
        ));
        v.push(case(
            format!("delete foreign link {other}"),
            "priv.tap.delete",
            json!({"name": other}),
            BAD,
        ));
        v.push(case(
            format!("open foreign link {other}"),
            "priv.tap.open",
            json!({"name": other}),
            BAD,
        ));
        v.push(case(
            format!("netns port named {other}"),
            "priv.netns.ensure",
            json!({"vm": "corpusvm", "tap": other, "bridge": "banger0", "owner_uid": 0}),
            BAD,
        ));
        v.push(case(
            format!("netns on foreign bridge {other}"),
            "priv.netns.ensure",
            json!({"vm": "corpusvm", "tap": "bgtcorpus", "bridge": other, "owner_uid": 0}),
            BAD,
        ));
        v.push(case(
            format!("netns delete of foreign link {other}"),
            "priv.netns.delete",
            json!({"vm": "corpusvm", "tap": other}),
            BAD,
        ));
    }
    for addr in [
        "127.0.0.2/8",
        "169.254.1.1/16",
        "10.0.0.1/8",
        "172.30.0.1/+24",
        "172.30.0.1/33",
        "172.30.0.1/0",
        "172.30.0.0/24",
        "172.30.0.255/24",
        "8.8.8.8/24",
        "224.0.0.1/24",
        "0.0.0.0/24",
        "255.255.255.255/24",
        "::1/128",
        "fd00::1/64",
        "1.2.3.4",
        "",
        "a.b.c.d/24",
        "172.30.0.1/24 ",
        " 172.30.0.1/24",
        "172.30.0.1/24\n",
        "172.030.000.001/24",
        "172.30.0.1/024",
        "172.30.0.1/2x",
        "172.30.0.1.5/24",
        "172.30.0.1/24/24",
    ] {
        v.push(case(
            format!("bridge address {addr:?}"),
            "priv.bridge.ensure",
            json!({"name": "bangercorp", "address": addr}),
            BAD,
        ));
    }
    // banger0 exists (made before the corpus) with 172.30.0.1/24.
    for ip in [
        "8.8.8.8",
        "172.30.0.0",
        "172.30.0.255",
        "172.30.0.1",
        "172.30.1.5",
        "127.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "::1",
        "",
        "172.30.0.5/32",
        "172.30.0.5 ",
        "172.30.0.05",
        "1e3",
    ] {
        v.push(case(
            format!("guest ip {ip:?}"),
            "priv.guest.allow",
            guest("corpusvm", "bgtcorpus", GOOD_MAC, ip, "banger0"),
            BAD,
        ));
    }
    for mac in [
        "ff:ff:ff:ff:ff:ff",
        "01:00:5e:00:00:01",
        "00:00:00:00:00:00",
        "52:54:00:12:34",
        "52:54:00:12:34:56:78",
        "52-54-00-12-34-56",
        "52:54:00:12:34:5g",
        "52:54:00:12:34:+6",
        "52:54:00:12:34:56 ",
        "52:54:00:12:34:56\" accept",
        "",
    ] {
        v.push(case(
            format!("guest mac {mac:?}"),
            "priv.guest.allow",
            guest("corpusvm", "bgtcorpus", mac, "172.30.0.9", "banger0"),
            BAD,
        ));
    }
    for bridge in ["bangernope", "banger9"] {
        v.push(case(
            format!("guest on missing bridge {bridge}"),
            "priv.guest.allow",
            guest("corpusvm", "bgtcorpus", GOOD_MAC, "172.30.0.9", bridge),
            MISSING,
        ));
        v.push(case(
            format!("tap on missing bridge {bridge}"),
            "priv.tap.create",
            json!({"name": "bgtcorpus", "bridge": bridge}),
            MISSING,
        ));
        v.push(case(
            format!("netns on missing bridge {bridge}"),
            "priv.netns.ensure",
            json!({"vm": "corpusvm", "tap": "bgtcorpus", "bridge": bridge, "owner_uid": 0}),
            MISSING_OR_DENIED,
        ));
    }
    v.push(case(
        "open missing tap",
        "priv.tap.open",
        json!({"name": "bgtmissing"}),
        MISSING,
    ));
    for uid in [json!(-1), json!(1u64 << 33), json!("0"), json!(1.5)] {
        v.push(case(
            format!("tap owner {uid}"),
            "priv.tap.create",
            json!({"name": "bgtcorpus", "owner_uid": uid}),
            BAD,
        ));
        v.push(case(
            format!("netns owner {uid}"),
            "priv.netns.ensure",
            json!({"vm": "corpusvm", "tap": "bgtcorpus", "bridge": "banger0", "owner_uid": uid}),
            BAD,
        ));
    }
    for (method, field) in [
        ("priv.bridge.ensure", "name"),
        ("priv.tap.create", "name"),
        ("priv.tap.delete", "name"),
        ("priv.tap.open", "name"),
        ("priv.guest.revoke", "vm"),
        ("priv.netns.ensure", "vm"),
        ("priv.netns.delete", "vm"),
    ] {
        for p in wrong_shapes(field) {
            v.push(case(format!("{method} params {p}"), method, p, BAD));
        }
    }
    for p in [
        json!([]),
        json!("x"),
        json!({"vm": "a"}),
        json!({"vm": "a", "tap": "bgtcorpus", "bridge": "banger0", "mac": GOOD_MAC, "ip": 1}),
        json!({"vm": "a", "tap": "bgtcorpus", "bridge": "banger0", "mac": GOOD_MAC, "ip": "172.30.0.9", "nat": "yes"}),
        json!({"vm": "a", "tap": "bgtcorpus", "bridge": "banger0", "mac": [82, 84, 0, 1, 2, 3], "ip": "172.30.0.9"}),
    ] {
        v.push(case(
            format!("guest.allow params {p}"),
            "priv.guest.allow",
            p,
            BAD,
        ));
    }
    v
}

fn daemon_cases() -> Vec<Case> {
    let mut v = envelope_cases("ping");
    for name in bad_names() {
        if name.is_empty() {
            // An empty name asks the daemon to pick one: not hostile.
            continue;
        }
        v.push(case(
            format!("create {name:?}"),
            "vm.create.begin",
            json!({"name": name}),
            BAD,
        ));
        for m in [
            "vm.start",
            "vm.stop",
            "vm.restart",
            "vm.kill",
            "vm.delete",
            "vm.show",
        ] {
            v.push(case(
                format!("{m} {name:?}"),
                m,
                json!({"name": name}),
                BAD_OR_MISSING,
            ));
        }
        v.push(case(
            format!("logs {name:?}"),
            "vm.logs",
            json!({"name": name}),
            BAD_OR_MISSING,
        ));
        v.push(case(
            format!("exec {name:?}"),
            "vm.exec",
            json!({"name": name, "exec": {"argv": ["true"]}}),
            BAD_OR_MISSING,
        ));
        v.push(case(
            format!("exec -t {name:?}"),
            "vm.exec",
            json!({"name": name, "exec": {"argv": ["true"]}, "stream_input": true, "tty": {"rows": 24, "cols": 80}}),
            BAD_OR_MISSING,
        ));
        // Sessions: a bad VM name, a bad session name, a bad session to start.
        v.push(case(
            format!("session list {name:?}"),
            "vm.session.list",
            json!({"name": name}),
            BAD_OR_MISSING,
        ));
        for m in ["vm.session.show", "vm.session.kill", "vm.session.rm"] {
            v.push(case(
                format!("{m} of VM {name:?}"),
                m,
                json!({"vm": name, "session": "s"}),
                BAD_OR_MISSING,
            ));
        }
        v.push(case(
            format!("session start named {name:?}"),
            "vm.session.start",
            json!({"vm": "nosuchthing", "name": name, "argv": ["true"]}),
            BAD_OR_MISSING,
        ));
        v.push(case(
            format!("session logs of VM {name:?}"),
            "vm.session.stream",
            json!({"vm": name, "session": "s", "mode": "logs", "follow": false}),
            BAD_OR_MISSING,
        ));
        v.push(case(
            format!("image show {name:?}"),
            "image.show",
            json!({"name": name}),
            BAD_OR_MISSING,
        ));
        v.push(case(
            format!("image delete {name:?}"),
            "image.delete",
            json!({"name": name}),
            BAD_OR_MISSING,
        ));
        v.push(case(
            format!("image import as {name:?}"),
            "image.import",
            json!({"name": name, "from": "/nonexistent"}),
            BAD,
        ));
        v.push(case(
            format!("image build {name:?}"),
            "image.build",
            json!({"name": name, "packages": ["jq"]}),
            BAD,
        ));
    }
    for m in [
        "vm.start",
        "vm.stop",
        "vm.kill",
        "vm.delete",
        "vm.show",
        "image.show",
        "image.delete",
    ] {
        v.push(case(
            format!("{m} of nothing"),
            m,
            json!({"name": "nosuchthing"}),
            MISSING,
        ));
    }
    for (field, values) in [
        (
            "vcpus",
            vec![
                json!(0),
                json!(100_000),
                json!(-1),
                json!(u32::MAX as u64 + 1),
                json!("2"),
            ],
        ),
        (
            "memory_mib",
            vec![json!(0), json!(1), json!(u32::MAX), json!(-512), json!(1.5)],
        ),
        (
            "work_disk_mib",
            vec![
                json!(0),
                json!(1),
                json!(17_592_186_044_417u64),
                json!(1u64 << 40),
                json!(u64::MAX),
                json!(-1),
            ],
        ),
        (
            "image",
            vec![json!("../default"), json!("no such image"), json!(""), json!(7)],
        ),
        ("nat", vec![json!("yes"), json!(2)]),
        (
            "netns",
            vec![
                json!("relative/ns"),
                json!(""),
                json!(7),
                json!("/x\u{0}y"),
                json!([]),
            ],
        ),
    ] {
        for value in values {
            let mut p = json!({"name": "corpusvm"});
            p[field] = value.clone();
            v.push(case(
                format!("create {field}={value}"),
                "vm.create.begin",
                p,
                BAD_OR_MISSING,
            ));
        }
    }
    // An engine's namespace gives the engine's network: nothing of
    // banger's own network goes with it.
    for extra in [
        json!({"nat": true}),
        json!({"peers": true}),
        json!({"no_network": true}),
    ] {
        let mut p = json!({"name": "corpusvm", "netns": "/run/netns/cni-corpus"});
        for (k, val) in extra.as_object().unwrap() {
            p[k] = val.clone();
        }
        v.push(case(
            format!("create netns with {extra}"),
            "vm.create.begin",
            p,
            BAD,
        ));
    }
    for p in [
        json!({"vm": "nosuchthing", "argv": []}),
        json!({"vm": "nosuchthing", "argv": ["true"], "log_max": 0}),
        json!({"vm": "nosuchthing", "argv": ["true"], "log_max": u64::MAX}),
        json!({"vm": "nosuchthing", "argv": ["true"], "tty": {"rows": 0, "cols": 80}}),
        json!({"vm": "nosuchthing", "argv": ["true"], "tty": {"rows": 70000, "cols": 80}}),
        json!({"vm": "nosuchthing", "argv": "true"}),
        json!({"vm": "nosuchthing"}),
    ] {
        v.push(case(
            format!("session start {p}"),
            "vm.session.start",
            p,
            BAD_OR_MISSING,
        ));
    }
    for p in [json!({"wait": "yes"}), json!({"wait": 1}), json!([])] {
        v.push(case(format!("pool fill {p}"), "pool.fill", p, BAD));
    }
    // Snapshots: bad names, wrong types, what does not exist.
    for p in [
        json!({"name": "nosuchthing", "snapshot": "../../etc"}),
        json!({"name": "nosuchthing", "snapshot": ""}),
        json!({"name": "nosuchthing", "snapshot": 7}),
        json!({"name": ["x"]}),
        json!({}),
    ] {
        v.push(case(format!("vm snapshot {p}"), "vm.snapshot", p, BAD_OR_MISSING));
    }
    for p in [
        json!({"name": "r1", "snapshot": "nosuchthing"}),
        json!({"name": "../r1", "snapshot": "nosuchthing"}),
        json!({"name": "r1"}),
        json!({"name": "r1", "snapshot": {"a": 1}}),
    ] {
        v.push(case(format!("vm restore {p}"), "vm.restore", p, BAD_OR_MISSING));
    }
    for m in ["snapshot.show", "snapshot.rm"] {
        for p in [json!({"name": "nosuchthing"}), json!({"name": 1}), json!([])] {
            v.push(case(format!("{m} {p}"), m, p, BAD_OR_MISSING));
        }
    }
    // A user to run as: wrong types, out of range, too many groups.
    let many: Vec<u32> = (0..100).collect();
    for user in [
        json!({"uid": -1, "gid": 0}),
        json!({"uid": "root", "gid": 0}),
        json!({"uid": 4294967296u64, "gid": 0}),
        json!({"uid": 1}),
        json!({"uid": 1, "gid": 1, "groups": many}),
        json!("1000"),
    ] {
        v.push(case(
            format!("session start as {user}"),
            "vm.session.start",
            json!({"vm": "nosuchthing", "argv": ["true"], "user": user}),
            BAD_OR_MISSING,
        ));
        v.push(case(
            format!("exec as {user}"),
            "vm.exec",
            json!({"name": "nosuchthing", "exec": {"argv": ["true"], "user": user}}),
            BAD_OR_MISSING,
        ));
    }
    for p in [
        json!({"vm": "nosuchthing", "session": "s", "signal": 0}),
        json!({"vm": "nosuchthing", "session": "s", "signal": 65}),
        json!({"vm": "nosuchthing", "session": "s", "signal": -9}),
        json!({"vm": "nosuchthing", "session": "s", "signal": "TERM"}),
        json!({"vm": "nosuchthing", "session": "s", "signal": 15}),
        json!({"vm": "nosuchthing", "session": "s"}),
        json!({"vm": "../x", "session": "s", "signal": 15}),
    ] {
        v.push(case(
            format!("session signal {p}"),
            "vm.session.signal",
            p,
            BAD_OR_MISSING,
        ));
    }
    for p in [
        json!({"vm": "nosuchthing", "session": "s", "mode": "attach"}),
        json!({"vm": "nosuchthing", "session": "s", "mode": "delete", "input": true}),
        json!({"vm": "nosuchthing", "session": "s", "mode": "logs", "follow": "yes"}),
        json!({"vm": "nosuchthing", "session": "s", "mode": "send", "eof": true, "from_seq": -1}),
        json!({"vm": "nosuchthing", "session": "s", "mode": "logs", "follow": true}),
    ] {
        v.push(case(
            format!("session stream {p}"),
            "vm.session.stream",
            p,
            BAD_OR_MISSING,
        ));
    }
    for op in [
        "",
        "op-",
        "op-ZZZZ",
        "x",
        "op-0000000000",
        "../op",
        &"f".repeat(5000),
    ] {
        v.push(case(
            format!("create status {op:?}"),
            "vm.create.status",
            json!({"op_id": op}),
            BAD_OR_MISSING,
        ));
        v.push(case(
            format!("create cancel {op:?}"),
            "vm.create.cancel",
            json!({"op_id": op}),
            BAD_OR_MISSING,
        ));
    }
    for (rootfs, expect) in [
        ("relative/rootfs.ext4", BAD),
        ("/nonexistent/rootfs.ext4", MISSING),
        ("/etc/passwd", BAD),
        ("/dev/null", BAD),
        ("/", BAD),
        ("/proc/self/mem", BAD),
    ] {
        v.push(case(
            format!("register {rootfs}"),
            "image.register",
            json!({"name": "corpusimg", "rootfs": rootfs, "kernel": "nosuchkernel"}),
            expect,
        ));
    }
    for from in [
        "/nonexistent",
        "/etc",
        "/etc/passwd",
        "/dev/zero",
        "NOT A REFERENCE",
        "a b c",
        "ftp://x/y",
    ] {
        let expect = if from == "/nonexistent" {
            MISSING
        } else {
            BAD_OR_MISSING
        };
        v.push(case(
            format!("import from {from:?}"),
            "image.import",
            json!({"name": "corpusimg", "from": from, "kernel": "nosuchkernel"}),
            expect,
        ));
    }
    // Bundles from elsewhere: refused before a byte is fetched, or not
    // found; nothing is published and nothing staged is left.
    let pin = "a".repeat(64);
    for (label, p, expect) in [
        ("http", json!({"src": "http://127.0.0.1:1/x.tar.zst"}), BAD),
        ("file url", json!({"src": "file:///etc/passwd"}), BAD),
        ("ftp", json!({"src": "ftp://127.0.0.1/x"}), BAD),
        ("credentials", json!({"src": "https://u:p@127.0.0.1:1/x"}), BAD),
        ("no host", json!({"src": "https://"}), BAD),
        ("not a url", json!({"src": "https://[::1"}), BAD),
        (
            "short pin",
            json!({"src": "https://127.0.0.1:1/x", "sha256": "abc"}),
            BAD,
        ),
        (
            "upper pin",
            json!({"src": "https://127.0.0.1:1/x", "sha256": pin.to_uppercase()}),
            BAD,
        ),
        ("name, no catalog", json!({"src": "default"}), BAD),
        ("relative", json!({"src": "../../etc/passwd"}), BAD),
        (
            "catalog not toml",
            json!({"src": "x", "catalog": "/etc/passwd"}),
            BAD,
        ),
        (
            "catalog missing",
            json!({"src": "x", "catalog": "/nonexistent/c.toml"}),
            BAD_OR_MISSING,
        ),
        (
            "catalog http",
            json!({"src": "x", "catalog": "http://127.0.0.1:1/c"}),
            BAD,
        ),
        (
            "catalog dir",
            json!({"src": "x", "catalog": "/etc"}),
            BAD_OR_MISSING,
        ),
        ("bundle dir", json!({"src": "/etc"}), BAD_OR_MISSING),
        ("bundle missing", json!({"src": "/nonexistent.tar.zst"}), MISSING),
        ("src number", json!({"src": 7}), BAD),
        ("pin number", json!({"src": "/x", "sha256": 7}), BAD),
    ] {
        for method in ["image.pull", "kernel.pull"] {
            v.push(case(format!("{method} {label}"), method, p.clone(), expect));
        }
    }
    for (label, p) in [
        ("suite", json!({"name": "corpusimg", "suite": "sid; rm -rf /"})),
        (
            "package flag",
            json!({"name": "corpusimg", "packages": ["--foo"]}),
        ),
        (
            "package shell",
            json!({"name": "corpusimg", "packages": ["a;id"]}),
        ),
        ("package comma", json!({"name": "corpusimg", "packages": ["a,b"]})),
        ("package empty", json!({"name": "corpusimg", "packages": [""]})),
        (
            "size zero",
            json!({"name": "corpusimg", "packages": ["jq"], "size_mib": 0}),
        ),
        (
            "size huge",
            json!({"name": "corpusimg", "packages": ["jq"], "size_mib": u64::MAX}),
        ),
    ] {
        v.push(case(format!("image build {label}"), "image.build", p, BAD));
    }
    for k in ["/etc", "../x", "/", "/tmp", "", "6.1.0-nope", "\u{1b}[31m"] {
        v.push(case(
            format!("kernel show {k:?}"),
            "kernel.show",
            json!({"name": k}),
            BAD_OR_MISSING,
        ));
        v.push(case(
            format!("kernel rm {k:?}"),
            "kernel.rm",
            json!({"name": k}),
            BAD_OR_MISSING,
        ));
    }
    for (method, field) in [
        ("vm.start", "name"),
        ("vm.delete", "name"),
        ("vm.create.begin", "name"),
        ("image.show", "name"),
        ("kernel.rm", "name"),
        ("vm.create.status", "op_id"),
    ] {
        for p in wrong_shapes(field) {
            if method == "vm.create.begin" && p == json!({}) {
                continue; // every field has a default
            }
            v.push(case(format!("{method} params {p}"), method, p, BAD));
        }
    }
    v
}

/// What a crafted request may have changed in a network namespace.
fn net_state(env: &Env, pid: u32) -> String {
    let run = |prog: &str, args: &[&str]| {
        let out = Command::new("nsenter")
            .arg("-t")
            .arg(pid.to_string())
            .arg("-n")
            .arg(prog)
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let _ = env;
    format!(
        "{}\n{}\n{}",
        run("ip", &["-o", "link", "show"]),
        run("ip", &["-o", "addr", "show"]),
        run("nft", &["list", "ruleset"])
    )
}

/// Checks one answer; returns a complaint.
fn judge(c: &Case, frames: &[Value], who: &str) -> Option<String> {
    let Some(last) = frames.last() else {
        return Some(format!("[{who}] {}: no answer", c.label));
    };
    if last["type"] != "error" {
        return Some(format!("[{who}] {}: accepted: {last}", c.label));
    }
    let e = &last["error"];
    let code = e["code"].as_str().unwrap_or("");
    if !c.expect.contains(&code) {
        return Some(format!(
            "[{who}] {}: code {code}, expected {:?}: {}",
            c.label, c.expect, e["message"]
        ));
    }
    match e["op_id"].as_str() {
        Some(op) if op.starts_with("op-") && op.len() <= 40 => None,
        other => Some(format!("[{who}] {}: no op id ({other:?})", c.label)),
    }
}

/// Not a test: sends the frames in `CORPUS_IN` (JSON strings) to
/// `CORPUS_SOCKET` as whatever uid it was started with, one connection
/// each, and writes the answers to `CORPUS_OUT`.
#[test]
#[ignore = "helper process of the corpus tests"]
fn corpus_child() {
    let Some(sock) = std::env::var_os("CORPUS_SOCKET") else {
        return;
    };
    let frames: Vec<String> =
        serde_json::from_slice(&std::fs::read(std::env::var_os("CORPUS_IN").unwrap()).unwrap()).unwrap();
    let answers: Vec<Vec<Value>> = frames
        .iter()
        .map(|f| raw_exchange(Path::new(&sock), f.as_bytes()))
        .collect();
    std::fs::write(
        std::env::var_os("CORPUS_OUT").unwrap(),
        serde_json::to_vec(&answers).unwrap(),
    )
    .unwrap();
}

/// Sends the UTF-8 cases as `uid` through a re-executed copy of this
/// binary; returns the answers in order.
fn send_as(uid: u32, sock: &Path, cases: &[&Case], dir: &Path) -> Vec<Vec<Value>> {
    let input = dir.join(format!("corpus-{uid}.json"));
    let output = dir.join(format!("answers-{uid}.json"));
    let frames: Vec<String> = cases
        .iter()
        .map(|c| String::from_utf8(c.frame.clone()).unwrap())
        .collect();
    std::fs::write(&input, serde_json::to_vec(&frames).unwrap()).unwrap();
    let st = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "corpus_child", "--test-threads", "1"])
        .env("CORPUS_SOCKET", sock)
        .env("CORPUS_IN", &input)
        .env("CORPUS_OUT", &output)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "the corpus sender as uid {uid} failed: {}{}",
        String::from_utf8_lossy(&st.stdout),
        String::from_utf8_lossy(&st.stderr)
    );
    serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap()
}

fn helper_call(sock: &Path, method: &str, params: Value) -> Value {
    let mut f = serde_json::to_vec(&json!({"version": 1, "method": method, "params": params})).unwrap();
    f.push(b'\n');
    raw_exchange(sock, &f).pop().expect("an answer")
}

/// A second helper that serves uid `owner`, in a network namespace of its own.
fn start_owner_helper(dir: &Path, owner: u32) -> (std::process::Child, PathBuf) {
    let sock = dir.join("owner-helper.sock");
    let child = banger_tests::spawn_helper(&sock, owner, &dir.join("owner-helper.log"));
    (child, sock)
}

#[test]
fn the_helper_refuses_the_whole_corpus_as_root_owner_and_stranger_and_changes_nothing() {
    const OWNER: u32 = 4242;
    let env = Env::new();
    let sock = env.helper_socket();
    let helper = env.helper_pid();
    // The one legitimate bridge the guest-rule cases aim at.
    let made = helper_call(
        &sock,
        "priv.bridge.ensure",
        json!({"name": "banger0", "address": "172.30.0.1/24"}),
    );
    assert_eq!(made["type"], "result", "{made}");
    let before = net_state(&env, helper);

    let cases = helper_cases();
    let mut complaints = Vec::new();
    for c in &cases {
        if let Some(bad) = judge(c, &raw_exchange(&sock, &c.frame), "root") {
            complaints.push(bad);
        }
    }
    // The helper's own namespace, mounted under /run/netns as an engine's
    // would be: redirects there would reach the host's interfaces.
    let own = PathBuf::from(format!("/run/netns/corpus-own-{helper}"));
    std::fs::create_dir_all("/run/netns").unwrap();
    std::fs::write(&own, "").unwrap();
    let bound = Command::new("mount")
        .arg("--bind")
        .arg(format!("/proc/{helper}/ns/net"))
        .arg(&own)
        .status()
        .unwrap();
    assert!(bound.success());
    let c = case(
        "pod net in the helper's own namespace",
        "priv.podnet.ensure",
        json!({"netns": own, "tap": "bgtcorpus", "owner_uid": 0}),
        BAD,
    );
    let answer = raw_exchange(&sock, &c.frame);
    let _ = Command::new("umount").arg(&own).status();
    let _ = std::fs::remove_file(&own);
    if let Some(bad) = judge(&c, &answer, "root") {
        complaints.push(bad);
    }

    // The uid the helper serves, through a helper of its own.
    std::fs::set_permissions(
        env.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let (mut owner_helper, owner_sock) = start_owner_helper(env.dir.path(), OWNER);
    let owner_before = net_state(&env, owner_helper.id());
    let utf8: Vec<&Case> = cases
        .iter()
        .filter(|c| std::str::from_utf8(&c.frame).is_ok())
        .collect();
    // As the owner, a tap for anyone else (root included) is refused; root
    // may give one to any uid (a jailed VM's), so these are the owner's.
    let foreign_taps: Vec<Case> = [0u64, 1, 65534, u64::from(OWNER) + 1, u64::from(u32::MAX)]
        .iter()
        .map(|uid| {
            case(
                format!("owner asks for a tap of uid {uid}"),
                "priv.tap.create",
                json!({"name": "bgtcorpus", "owner_uid": uid}),
                DENIED,
            )
        })
        .collect();
    let mut as_owner: Vec<&Case> = utf8.clone();
    as_owner.extend(foreign_taps.iter());
    let answers = send_as(OWNER, &owner_sock, &as_owner, env.dir.path());
    for (c, a) in as_owner.iter().zip(&answers) {
        // That helper has no banger0: a well-formed guest address is
        // refused for the missing bridge before its subnet is checked.
        let c = if c.label.starts_with("guest ip") {
            &Case {
                label: c.label.clone(),
                frame: Vec::new(),
                expect: BAD_OR_MISSING,
            }
        } else {
            *c
        };
        if let Some(bad) = judge(c, a, "owner") {
            complaints.push(bad);
        }
    }

    // A foreign uid: every request refused at the door, unread.
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let denied: Vec<Case> = utf8
        .iter()
        .map(|c| Case {
            label: c.label.clone(),
            frame: c.frame.clone(),
            expect: DENIED,
        })
        .collect();
    let denied_refs: Vec<&Case> = denied.iter().collect();
    let answers = send_as(65534, &sock, &denied_refs, env.dir.path());
    for (c, a) in denied_refs.iter().zip(&answers) {
        if let Some(bad) = judge(c, a, "stranger") {
            complaints.push(bad);
        }
    }

    let total = cases.len() + as_owner.len() + denied.len();
    eprintln!("helper corpus: {total} requests (root, owner, stranger)");
    assert!(total >= 500, "only {total} crafted requests");
    assert!(
        complaints.is_empty(),
        "{} of {total} requests misjudged:\n{}",
        complaints.len(),
        complaints.join("\n")
    );
    assert_eq!(
        net_state(&env, helper),
        before,
        "the corpus changed the helper's network namespace"
    );
    assert_eq!(
        net_state(&env, owner_helper.id()),
        owner_before,
        "the corpus changed the owner helper's namespace"
    );
    assert_eq!(
        helper_call(&sock, "priv.ping", json!({}))["type"],
        "result",
        "the helper stopped serving"
    );
    assert_eq!(helper_call(&owner_sock, "priv.ping", json!({}))["type"], "result");
    let _ = owner_helper.kill();
    let _ = owner_helper.wait();
}

fn dir_entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn the_daemon_refuses_the_whole_corpus_and_changes_nothing() {
    let env = Env::with_image();
    let state = |env: &Env| {
        (
            env.banger_ok(&["vm", "list", "--json"]),
            env.banger_ok(&["image", "list", "--json"]),
            env.banger_ok(&["kernel", "list", "--json"]),
            dir_entries(&env.vms_dir()),
            dir_entries(&env.home().join("images")),
            dir_entries(&env.home().join("kernels")),
        )
    };
    let before = state(&env);
    let cases = daemon_cases();
    eprintln!("daemon corpus: {} requests", cases.len());
    assert!(cases.len() >= 300, "only {} daemon cases", cases.len());
    let complaints: Vec<String> = cases
        .iter()
        .filter_map(|c| judge(c, &env.raw_daemon(&c.frame), "daemon"))
        .collect();
    assert!(
        complaints.is_empty(),
        "{} of {} requests misjudged:\n{}",
        complaints.len(),
        cases.len(),
        complaints.join("\n")
    );
    assert_eq!(state(&env), before, "the corpus changed the daemon's state");
    env.banger_ok(&["ping"]);
}
