//! Every request body the Firecracker back-end sends, checked against
//! Firecracker's own API description (tests/fixtures/firecracker-v1.16.1.yaml,
//! Firecracker v1.16.1's swagger file, kept here so the check runs anywhere):
//! the path and method exist, the body is the definition the API expects,
//! required fields are present, no field is unknown, types and enums match.

use banger_vmm::firecracker::{plan, restore_plan, snapshot_call, Paths};
use banger_vmm::{Drive, LaunchSpec};
use serde_json::Value;
use std::path::PathBuf;

fn spec() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/firecracker-v1.16.1.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "Firecracker's API description is required at {}: {e}",
            path.display()
        )
    });
    serde_yaml::from_str(&text).expect("valid YAML")
}

fn path_matches(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(a, b)| a == b || (a.starts_with('{') && a.ends_with('}')))
}

fn check(def_name: &str, schema: &Value, body: &Value, errors: &mut Vec<String>) {
    let Some(obj) = body.as_object() else {
        errors.push(format!("{def_name}: body is not an object"));
        return;
    };
    let props = schema["properties"].as_object().cloned().unwrap_or_default();
    for req in schema["required"].as_array().into_iter().flatten() {
        if !obj.contains_key(req.as_str().unwrap()) {
            errors.push(format!("{def_name}: missing required field {req}"));
        }
    }
    for (k, v) in obj {
        let Some(p) = props.get(k) else {
            errors.push(format!("{def_name}: unknown field {k}"));
            continue;
        };
        let ok = match p["type"].as_str() {
            Some("string") => v.is_string(),
            Some("integer") => v.is_u64() || v.is_i64(),
            Some("boolean") => v.is_boolean(),
            Some("object") => v.is_object(),
            _ => true,
        };
        if !ok {
            errors.push(format!("{def_name}.{k}: {v} is not a {}", p["type"]));
        }
        if let Some(en) = p["enum"].as_array() {
            if !en.contains(v) {
                errors.push(format!("{def_name}.{k}: {v} not in {en:?}"));
            }
        }
        if let (Some(min), Some(n)) = (p["minimum"].as_u64(), v.as_u64()) {
            if n < min {
                errors.push(format!("{def_name}.{k}: {n} < minimum {min}"));
            }
        }
        if let (Some(max), Some(n)) = (p["maximum"].as_u64(), v.as_u64()) {
            if n > max {
                errors.push(format!("{def_name}.{k}: {n} > maximum {max}"));
            }
        }
    }
}

fn launch_spec() -> LaunchSpec {
    LaunchSpec {
        vm_dir: "/var/lib/banger/vms/abc".into(),
        kernel: "/var/lib/banger/kernels/6.1/vmlinux".into(),
        initrd: Some("/var/lib/banger/kernels/6.1/initramfs.cpio".into()),
        cmdline: "console=ttyS0 banger.hostname=dev".into(),
        vcpus: 2,
        memory_mib: 1024,
        drives: vec![
            Drive {
                id: "base".into(),
                path: "/img/rootfs.ext4".into(),
                read_only: true,
            },
            Drive {
                id: "overlay".into(),
                path: "/vm/overlay.ext4".into(),
                read_only: false,
            },
            Drive {
                id: "work".into(),
                path: "/vm/work.ext4".into(),
                read_only: false,
            },
        ],
        vsock_cid: 3,
        net: Some(banger_vmm::NetSpec {
            netns: None,
            tap: "bgt0a1b2c3d".into(),
            fd: None,
            mac: "52:54:00:0a:1b:2c".into(),
        }),
        restore: None,
        fill_drives: None,
        prestarted: None,
    }
}

/// The network card is really configured: the VM's tap by name with its
/// MAC, before the instance starts; and no card without a network.
#[test]
fn the_network_card_is_sent_before_instance_start() {
    let ls = launch_spec();
    let calls = plan(&ls, &Paths::new(&ls.vm_dir));
    let net = calls
        .iter()
        .position(|c| c.method == "PUT" && c.path == "/network-interfaces/eth0")
        .expect("no PUT /network-interfaces in the plan");
    let start = calls.iter().position(|c| c.path == "/actions").unwrap();
    assert!(net < start, "the card is configured after InstanceStart");
    let body = &calls[net].body;
    assert_eq!(body["host_dev_name"], "bgt0a1b2c3d");
    assert_eq!(body["guest_mac"], "52:54:00:0a:1b:2c");
    assert_eq!(body["iface_id"], "eth0");

    let mut no_net = launch_spec();
    no_net.net = None;
    let calls = plan(&no_net, &Paths::new(&no_net.vm_dir));
    assert!(!calls.iter().any(|c| c.path.starts_with("/network-interfaces")));
}

#[test]
fn every_body_banger_sends_matches_the_api_description() {
    let api = spec();
    let ls = launch_spec();
    let mut calls = plan(&ls, &Paths::new(&ls.vm_dir));
    assert!(
        calls.iter().any(|c| c.path == "/actions"),
        "the plan never starts the instance"
    );
    // A restore, and the snapshot it comes from, are checked the same way.
    let r = banger_vmm::Restore {
        state: "/snapshot-state".into(),
        memory: "/snapshot-mem".into(),
        seed: None,
    };
    let restore = restore_plan(&ls, &Paths::new(&ls.vm_dir), &r);
    let load = restore.last().unwrap();
    assert_eq!(load.path, "/snapshot/load");
    assert_eq!(load.body["network_overrides"][0]["host_dev_name"], "bgt0a1b2c3d");
    assert_eq!(load.body["mem_backend"]["backend_path"], "/snapshot-mem");
    assert!(!restore
        .iter()
        .any(|c| c.path == "/actions" || c.path.starts_with("/drives")));
    calls.extend(restore);
    calls.push(snapshot_call(&r.state, &r.memory));
    let mut errors = Vec::new();
    for c in &calls {
        let paths = api["paths"].as_object().unwrap();
        let Some((_, ops)) = paths.iter().find(|(t, _)| path_matches(t, &c.path)) else {
            errors.push(format!("{} is not an API path", c.path));
            continue;
        };
        let op = &ops[c.method.to_ascii_lowercase()];
        if op.is_null() {
            errors.push(format!("{} {} is not an API operation", c.method, c.path));
            continue;
        }
        let body_ref = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["in"] == "body")
            .and_then(|p| p["schema"]["$ref"].as_str())
            .unwrap_or_default()
            .to_string();
        assert_eq!(
            body_ref,
            format!("#/definitions/{}", c.definition),
            "{} {}",
            c.method,
            c.path
        );
        check(
            c.definition,
            &api["definitions"][c.definition],
            &c.body,
            &mut errors,
        );
    }
    assert!(
        errors.is_empty(),
        "bodies that do not match the API:\n{}",
        errors.join("\n")
    );
}

#[test]
fn the_checker_catches_a_bad_body() {
    let api = spec();
    let mut errors = Vec::new();
    let bad = serde_json::json!({"vcpu_count": 0, "mem": 5});
    check(
        "MachineConfiguration",
        &api["definitions"]["MachineConfiguration"],
        &bad,
        &mut errors,
    );
    assert!(
        errors.iter().any(|e| e.contains("missing required field")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("unknown field mem")),
        "{errors:?}"
    );
    assert!(errors.iter().any(|e| e.contains("minimum")), "{errors:?}");
}
