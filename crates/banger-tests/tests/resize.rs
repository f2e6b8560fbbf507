//! `vm set` on a stopped VM: more vCPUs, memory and work disk are what the
//! guest sees at its next start, with the files on the work disk kept; a
//! running VM and a shrinking disk are refused and change nothing.

use banger_tests::Env;

#[test]
fn a_stopped_vm_gets_new_resources_and_keeps_its_files() {
    let env = Env::with_image();
    env.create_small("grow", &[]);
    env.banger_ok(&[
        "vm",
        "exec",
        "grow",
        "--",
        "sh",
        "-c",
        "echo kept > /root/kept && sync",
    ]);

    // Running: refused, nothing changed.
    let running = env.banger(&["vm", "set", "grow", "--vcpus", "2"]);
    assert!(!running.status.success());
    assert!(String::from_utf8_lossy(&running.stderr).contains("stop it first"));

    env.banger_ok(&["vm", "stop", "grow"]);
    let shrink = env.banger(&["vm", "set", "grow", "--disk-size", "64"]);
    assert!(!shrink.status.success());
    assert!(
        String::from_utf8_lossy(&shrink.stderr).contains("not shrink"),
        "{shrink:?}"
    );
    assert_eq!(env.vm("grow")["work_disk_bytes"], 128u64 << 20);

    let set: serde_json::Value = serde_json::from_str(&env.banger_ok(&[
        "vm",
        "set",
        "grow",
        "--vcpus",
        "2",
        "--memory",
        "640",
        "--disk-size",
        "384",
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        (set["vcpus"].as_u64(), set["memory_mib"].as_u64()),
        (Some(2), Some(640)),
        "{set}"
    );
    assert_eq!(set["work_disk_bytes"], 384u64 << 20);

    env.banger_ok(&["vm", "start", "grow"]);
    let seen = env.banger_ok(&[
        "vm",
        "exec",
        "grow",
        "--",
        "sh",
        "-c",
        "nproc; awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo; df -m --output=size /root | tail -1; cat /root/kept",
    ]);
    let lines: Vec<&str> = seen.lines().map(str::trim).collect();
    assert_eq!(lines[0], "2", "{seen}");
    let mem: u64 = lines[1].parse().unwrap();
    assert!((560..=640).contains(&mem), "guest memory {mem} MiB: {seen}");
    let disk: u64 = lines[2].parse().unwrap();
    assert!(disk > 300, "work disk {disk} MiB after growing to 384: {seen}");
    assert_eq!(lines[3], "kept", "the work disk lost its files: {seen}");
    env.banger_ok(&["vm", "delete", "grow"]);
}
