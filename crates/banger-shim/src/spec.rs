//! What the OCI runtime spec (the bundle's config.json, or an exec's
//! process) asks for, in banger's terms.

use serde_json::Value;

/// A process to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Process {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub terminal: bool,
    /// Who it runs as; `None` for root (uid and gid 0, no extra groups).
    #[serde(default)]
    pub user: Option<banger_proto::methods::agent::User>,
}

/// The VM's size, from the spec's Linux resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Size {
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
}

/// An OCI `process` object.
pub fn process(p: &Value) -> Process {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    Process {
        args: strings(&p["args"]),
        env: strings(&p["env"])
            .into_iter()
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect(),
        cwd: p["cwd"]
            .as_str()
            .filter(|c| !c.is_empty() && *c != "/")
            .map(String::from),
        terminal: p["terminal"].as_bool().unwrap_or(false),
        user: user(&p["user"]),
    }
}

/// An OCI `process.user`, numeric as the runtime spec has it (names were
/// resolved by the engine against the image's /etc/passwd).
fn user(u: &Value) -> Option<banger_proto::methods::agent::User> {
    let id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
    let user = banger_proto::methods::agent::User {
        uid: id(&u["uid"]),
        gid: id(&u["gid"]),
        groups: u["additionalGids"]
            .as_array()
            .map(|a| a.iter().map(id).filter(|g| *g != 0).collect())
            .unwrap_or_default(),
    };
    (user != banger_proto::methods::agent::User::default()).then_some(user)
}

/// CPU quota and memory limit as a VM size: vCPUs rounded up from
/// quota/period, memory in MiB (at least 128).
pub fn size(spec: &Value) -> Size {
    let r = &spec["linux"]["resources"];
    let vcpus = match (r["cpu"]["quota"].as_i64(), r["cpu"]["period"].as_u64()) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some(((q as u64).div_ceil(p)).clamp(1, 64) as u32),
        _ => None,
    };
    let memory_mib = r["memory"]["limit"]
        .as_i64()
        .filter(|l| *l > 0)
        .map(|l| ((l as u64) >> 20).clamp(128, 1 << 20) as u32);
    Size { vcpus, memory_mib }
}

/// The annotations the CRI plugin puts on a pod's containers.
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// What a container is to its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not in a pod (`ctr run`, Nomad): a VM of its own.
    Alone,
    /// A pod's sandbox (pause) container: the pod's VM.
    Sandbox,
    /// A later container of pod `sandbox`: a process in the pod's VM.
    Member { sandbox: String },
}

pub fn role(spec: &Value) -> Role {
    let a = &spec["annotations"];
    match (a[CONTAINER_TYPE].as_str(), a[SANDBOX_ID].as_str()) {
        (Some("sandbox"), _) => Role::Sandbox,
        (Some("container"), Some(s)) if !s.is_empty() => Role::Member {
            sandbox: s.to_string(),
        },
        _ => Role::Alone,
    }
}

/// Which shim serves container `id`: one per pod (its sandbox's id), as
/// containerd expects of a runtime that groups, else one per container.
pub fn grouping(spec: &Value, id: &str) -> String {
    match role(spec) {
        Role::Member { sandbox } => sandbox,
        _ => id.to_string(),
    }
}

/// The network the spec gives the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// No network namespace in the spec: the host's network, which for a
    /// VM is banger's own bridge.
    Host,
    /// A new, empty namespace: no network.
    Isolated,
    /// The engine's namespace (CNI set it up): the VM's link lives there.
    Namespace(String),
}

pub fn network(spec: &Value) -> Network {
    let ns = spec["linux"]["namespaces"].as_array();
    match ns.and_then(|n| n.iter().find(|n| n["type"] == "network")) {
        None => Network::Host,
        Some(n) => match n["path"].as_str() {
            Some(p) if !p.is_empty() => Network::Namespace(p.to_string()),
            _ => Network::Isolated,
        },
    }
}

/// The files a CRI plugin binds into a pod's containers that are worth a
/// copy in the guest: names and resolvers (the pod's DNS), as
/// (host file, path in the container).
pub fn etc_files(spec: &Value) -> Vec<(String, String)> {
    const COPIED: [&str; 3] = ["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"];
    spec["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let dest = m["destination"].as_str()?;
            let src = m["source"].as_str()?;
            (COPIED.contains(&dest) && m["type"].as_str().unwrap_or("bind") == "bind" && src.starts_with('/'))
                .then(|| (src.to_string(), dest.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_spec_becomes_a_process_and_a_size() {
        let spec = json!({
            "process": {"args": ["sh", "-c", "exit 3"], "env": ["PATH=/bin", "A=b=c", "junk"],
                        "cwd": "/work", "terminal": true},
            "linux": {"resources": {"cpu": {"quota": 150000, "period": 100000},
                                    "memory": {"limit": 536870912}}}
        });
        let p = process(&spec["process"]);
        assert_eq!(p.args, ["sh", "-c", "exit 3"]);
        assert_eq!(
            p.env,
            [("PATH".into(), "/bin".into()), ("A".into(), "b=c".into())]
        );
        assert_eq!(p.cwd.as_deref(), Some("/work"));
        assert!(p.terminal);
        assert_eq!(
            size(&spec),
            Size {
                vcpus: Some(2),
                memory_mib: Some(512)
            }
        );
        assert_eq!(size(&json!({})), Size::default());
        assert_eq!(process(&json!({"cwd": "/"})).cwd, None);
        // Root is no user; anyone else is, with their groups.
        assert_eq!(process(&json!({"user": {"uid": 0, "gid": 0}})).user, None);
        let u = process(&json!({"user": {"uid": 1000, "gid": 100, "additionalGids": [100, 27]}})).user;
        assert_eq!(u.map(|u| u.to_arg()).as_deref(), Some("1000:100:100,27"));
    }

    #[test]
    fn annotations_say_what_a_container_is_to_its_pod() {
        let sandbox = json!({"annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_ID: "p1"}});
        let member = json!({"annotations": {CONTAINER_TYPE: "container", SANDBOX_ID: "p1"}});
        assert_eq!(role(&sandbox), Role::Sandbox);
        assert_eq!(role(&member), Role::Member { sandbox: "p1".into() });
        assert_eq!(role(&json!({})), Role::Alone);
        assert_eq!(grouping(&member, "c1"), "p1");
        assert_eq!(grouping(&sandbox, "p1"), "p1");
        assert_eq!(grouping(&json!({}), "c1"), "c1");
    }

    #[test]
    fn the_network_namespace_says_which_network() {
        assert_eq!(
            network(&json!({"linux": {"namespaces": [{"type": "pid"}]}})),
            Network::Host
        );
        assert_eq!(
            network(&json!({"linux": {"namespaces": [{"type": "network"}]}})),
            Network::Isolated
        );
        assert_eq!(
            network(&json!({"linux": {"namespaces": [{"type": "network", "path": "/run/netns/cni-1"}]}})),
            Network::Namespace("/run/netns/cni-1".into())
        );
    }

    #[test]
    fn only_the_pods_names_and_resolvers_are_copied() {
        let spec = json!({"mounts": [
            {"destination": "/etc/resolv.conf", "type": "bind", "source": "/s/resolv.conf"},
            {"destination": "/etc/hosts", "source": "/s/hosts", "options": ["rbind"]},
            {"destination": "/data", "type": "bind", "source": "/host/data"},
            {"destination": "/etc/hostname", "type": "bind", "source": "relative"},
            {"destination": "/proc", "type": "proc", "source": "proc"}
        ]});
        assert_eq!(
            etc_files(&spec),
            [
                ("/s/resolv.conf".to_string(), "/etc/resolv.conf".to_string()),
                ("/s/hosts".to_string(), "/etc/hosts".to_string())
            ]
        );
    }
}
