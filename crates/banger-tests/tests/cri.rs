//! The path a kubelet takes, without a kubelet: a Kubernetes CRI client
//! (generated from the CRI protobufs) drives the real containerd's CRI
//! plugin, which runs pods through `containerd-shim-banger-v2` (runtime
//! handler `banger`). A pod is one VM: its sandbox (pause) container
//! boots it, its later containers run inside it, each chrooted into its
//! own image's tree, sharing the pod's network. After the pod is stopped
//! and removed, nothing of it is left.

use banger_tests::containerd::{oci_archive_with, Containerd};
use banger_tests::{wait_for, Env};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};

const PAUSE: &str = "docker.io/banger/pause:test";
const APP: &str = "docker.io/banger/app:test";

async fn connect(sock: &Path) -> RuntimeServiceClient<Channel> {
    let sock = sock.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(sock).await?)) }
        }))
        .await
        .expect("containerd's CRI socket");
    RuntimeServiceClient::new(channel)
}

/// A pod's network: `Node` is the host's (a kubelet's `hostNetwork:
/// true`), `Pod` one of its own that CNI sets up.
fn network(mode: cri::NamespaceMode) -> Option<cri::NamespaceOption> {
    Some(cri::NamespaceOption {
        network: mode as i32,
        ..Default::default()
    })
}

fn pod_config(logs: &Path, mode: cri::NamespaceMode) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "sandbox".into(),
            uid: "uid-1".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "pod-one".into(),
        log_directory: logs.display().to_string(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.77.0.53".into()],
            searches: vec!["svc.banger.test".into()],
            options: vec![],
        }),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: network(mode),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The VMs banger has, by name.
fn vms(env: &Env) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&env.banger_ok(&["vm", "list", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect()
}

/// A containerd with its CRI plugin for `env`, with the pause and app
/// images imported; CNI configurations in `<dir>/cni`.
struct Cluster {
    dir: tempfile::TempDir,
    ctrd: Containerd,
    logs: std::path::PathBuf,
}

impl Cluster {
    fn new(env: &Env, cni_conflist: Option<&str>, netns_of: Option<u32>) -> Cluster {
        let dir = tempfile::Builder::new().prefix("banger-cri").tempdir().unwrap();
        let cni = dir.path().join("cni");
        std::fs::create_dir_all(&cni).unwrap();
        if let Some(c) = cni_conflist {
            std::fs::write(cni.join("10-banger-pods.conflist"), c).unwrap();
        }
        let ctrd = Containerd::start_cri(dir.path(), &env.banger_env(), PAUSE, &cni, netns_of);
        for (name, cmd, marker) in [
            (PAUSE, &["sleep", "100000000"][..], "pause"),
            (APP, &["sh"][..], "app"),
        ] {
            let archive = dir.path().join(format!("{marker}.tar"));
            std::fs::write(&archive, oci_archive_with(name, cmd, marker)).unwrap();
            let o = ctrd.ctr_in("k8s.io", &["image", "import", archive.to_str().unwrap()]);
            assert!(
                o.status.success(),
                "import: {}",
                banger_tests::containerd::text(&o)
            );
        }
        let logs = dir.path().join("pod-logs");
        std::fs::create_dir_all(&logs).unwrap();
        Cluster { dir, ctrd, logs }
    }
}

/// A container of the app image running `command`, in `network` mode.
fn app_container(command: &[&str], network: cri::NamespaceMode) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "app".into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: APP.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        envs: vec![cri::KeyValue {
            key: "GREETING".into(),
            value: "hello".into(),
        }],
        log_path: "app.log".into(),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: network as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// RunPodSandbox with runtime handler `banger`: the pod's id.
async fn run_pod(
    c: &mut RuntimeServiceClient<Channel>,
    ctrd: &Containerd,
    config: &cri::PodSandboxConfig,
) -> String {
    c.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: "banger".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctrd.log_tail()))
    .into_inner()
    .pod_sandbox_id
}

/// StopPodSandbox, then RemovePodSandbox, as a kubelet ends a pod.
async fn stop_and_remove(c: &mut RuntimeServiceClient<Channel>, ctrd: &Containerd, pod: &str) {
    c.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", ctrd.log_tail()));
    c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", ctrd.log_tail()));
}

/// CreateContainer in `pod`, then StartContainer: the container's id.
async fn create_and_start(
    c: &mut RuntimeServiceClient<Channel>,
    ctrd: &Containerd,
    pod: &str,
    sandbox: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> String {
    let id = c
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", ctrd.log_tail()))
        .into_inner()
        .container_id;
    c.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", ctrd.log_tail()));
    id
}

async fn exec_sync(c: &mut RuntimeServiceClient<Channel>, id: &str, cmd: &[&str]) -> (i32, String) {
    let r = c
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}"))
        .into_inner();
    (r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned())
}

#[test]
fn a_pod_through_cri_is_one_vm_and_its_containers_run_inside_it() {
    let env = Env::with_image_in_netns();
    let cluster = Cluster::new(&env, None, None);
    let (ctrd, logs) = (&cluster.ctrd, &cluster.logs);
    let _keep = &cluster.dir;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = connect(&ctrd.sock).await;
        let v = c
            .version(cri::VersionRequest::default())
            .await
            .unwrap_or_else(|e| panic!("CRI version: {e}\n{}", ctrd.log_tail()))
            .into_inner();
        assert_eq!(v.runtime_name, "containerd");

        // RunPodSandbox with handler `banger`: the pod is a VM.
        let config = pod_config(logs, cri::NamespaceMode::Node);
        let pod = run_pod(&mut c, ctrd, &config).await;
        let pod_vms = vms(&env);
        assert_eq!(pod_vms.len(), 1, "one VM for the pod: {pod_vms:?}");
        let vm = pod_vms[0].clone();
        assert!(vm.starts_with("ct-"), "{vm}");
        assert_eq!(env.vm(&vm)["state"], "running");

        // A container of the pod: a process in the pod's VM, in its own
        // tree, as the user its security context names.
        let mut app = app_container(
            &[
                "sh",
                "-c",
                "echo app says $GREETING as $(id -u):$(id -g); exec sleep 100000",
            ],
            cri::NamespaceMode::Node,
        );
        let security = app
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .unwrap();
        security.run_as_user = Some(cri::Int64Value { value: 1000 });
        security.run_as_group = Some(cri::Int64Value { value: 1001 });
        let created = create_and_start(&mut c, ctrd, &pod, &config, app).await;
        assert_eq!(
            vms(&env),
            std::slice::from_ref(&vm),
            "the container joined the pod's VM"
        );
        let status = c
            .container_status(cri::ContainerStatusRequest {
                container_id: created.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32);
        // Its output reaches the container's log, as the kubelet reads it.
        let log = logs.join("app.log");
        wait_for(
            "the container's output in its log",
            Duration::from_secs(30),
            || {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|l| l.contains("app says hello as 1000:1001"))
            },
        );

        // ExecSync: in the container's root (its image, not the pause
        // image), with the guest's kernel, and its exit code.
        let r = c
            .exec_sync(cri::ExecSyncRequest {
                container_id: created.clone(),
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "cat /etc/banger-image; uname -r; ls /proc/1/ >/dev/null && echo proc; id -u; exit 4"
                        .into(),
                ],
                timeout: 60,
            })
            .await
            .unwrap_or_else(|e| panic!("ExecSync: {e}\n{}", ctrd.log_tail()))
            .into_inner();
        let out = String::from_utf8_lossy(&r.stdout).to_string();
        assert_eq!(
            r.exit_code,
            4,
            "stdout {out:?} stderr {:?}",
            String::from_utf8_lossy(&r.stderr)
        );
        let lines: Vec<&str> = out.lines().collect();
        let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(
            lines.first(),
            Some(&"app"),
            "not the container's own tree: {out:?}"
        );
        assert!(
            lines
                .get(1)
                .is_some_and(|k| k.contains("cloud") && *k != host.trim()),
            "not the guest's kernel: {out:?}"
        );
        assert_eq!(lines.get(2), Some(&"proc"), "no /proc in the container: {out:?}");
        assert_eq!(
            lines.get(3),
            Some(&"1000"),
            "ExecSync not as the container's user: {out:?}"
        );
        // The sandbox's own process still runs in the pause image's tree:
        // the guest's root is the pause image.
        let root = env.banger_ok(&["vm", "exec", &vm, "--", "cat", "/etc/banger-image"]);
        assert_eq!(root.trim(), "pause");
        // The container shares the pod's network: the VM's one address.
        let ip = env.guest_ip(&vm);
        let r = c
            .exec_sync(cri::ExecSyncRequest {
                container_id: created.clone(),
                cmd: vec!["ip".into(), "-4".into(), "addr".into()],
                timeout: 60,
            })
            .await
            .unwrap()
            .into_inner();
        let addrs = String::from_utf8_lossy(&r.stdout).to_string();
        assert!(addrs.contains(&format!("inet {ip}/")), "{ip} not in {addrs}");

        // StopPodSandbox, RemovePodSandbox: nothing of the pod is left.
        stop_and_remove(&mut c, ctrd, &pod).await;
        let listed = c
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await
            .unwrap()
            .into_inner()
            .items;
        assert!(listed.is_empty(), "{listed:?}");
    });
    wait_for("the pod's VM to go", Duration::from_secs(30), || {
        vms(&env).is_empty().then_some(())
    });
    wait_for("the pod's shim to exit", Duration::from_secs(30), || {
        ctrd.shims("").is_empty().then_some(())
    });
    assert!(env.vm_processes().is_empty(), "VMM processes left");
    let taps = env.ip_in_helper_ns(&["-o", "link", "show", "type", "tun"]);
    assert!(
        String::from_utf8_lossy(&taps.stdout).trim().is_empty(),
        "taps left: {}",
        String::from_utf8_lossy(&taps.stdout)
    );
}

/// A bridge network for pods with addresses from 10.77.0.0/24, as a
/// cluster's CNI configuration would give (host-local keeps its leases
/// under `ipam`).
fn bridge_conflist(ipam: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "banger-pods",
        "plugins": [{
            "type": "bridge",
            "bridge": "cnibanger0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.77.0.0/24"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": ipam.display().to_string()
            }
        }]
    })
    .to_string()
}

#[test]
fn a_pod_on_a_cni_network_is_the_vm_at_the_address_the_engine_gave_it() {
    // containerd (and so CNI's bridge) in the same private namespace as
    // banger's helper and daemon: nothing is made on the host's network.
    let env = Env::with_image_in_netns();
    let ipam = tempfile::Builder::new().prefix("banger-ipam").tempdir().unwrap();
    let cluster = Cluster::new(&env, Some(&bridge_conflist(ipam.path())), Some(env.helper_pid()));
    let (ctrd, logs) = (&cluster.ctrd, &cluster.logs);
    let namespaces = || -> Vec<std::ffi::OsString> {
        std::fs::read_dir("/run/netns")
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    };
    let before = namespaces();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = connect(&ctrd.sock).await;
        let config = pod_config(logs, cri::NamespaceMode::Pod);
        let pod = run_pod(&mut c, ctrd, &config).await;
        // The address CNI gave the pod is the guest's.
        let status = c
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        let pod_ip = status.network.map(|n| n.ip).unwrap_or_default();
        assert!(pod_ip.starts_with("10.77.0."), "pod address: {pod_ip:?}");
        let vm = vms(&env).pop().expect("the pod's VM");
        assert_eq!(
            env.guest_ip(&vm),
            pod_ip,
            "the guest does not wear the pod's address"
        );

        let created = create_and_start(
            &mut c,
            ctrd,
            &pod,
            &config,
            app_container(
                &["busybox", "httpd", "-f", "-p", "8080", "-h", "/etc"],
                cri::NamespaceMode::Pod,
            ),
        )
        .await;

        // From the engine's side of the network, the pod's address reaches
        // the container's server in the guest.
        // (bash's /dev/tcp: the host's static busybox wget cannot resolve.)
        let get = format!(
            "exec 3<>/dev/tcp/{pod_ip}/8080 && printf 'GET /banger-image HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
        );
        // One HTTP answer of the pod's server (None until it answers).
        let fetch = || {
            let o = env.in_helper_ns("timeout", &["5", "bash", "-c", &get]);
            let r = String::from_utf8_lossy(&o.stdout).to_string();
            r.contains("200 OK").then_some(r)
        };
        let reply = wait_for("the pod's server at its address", Duration::from_secs(60), fetch);
        assert_eq!(reply.lines().last().map(str::trim), Some("app"), "{reply}");
        // bangerd killed with SIGKILL and started again adopts the pod's
        // VM: its address still answers, and the shim reaches it.
        env.kill_daemon();
        assert_eq!(env.vm(&vm)["state"], "running");
        let again = wait_for(
            "the pod after the daemon's restart",
            Duration::from_secs(30),
            fetch,
        );
        assert!(again.ends_with("app\n"), "{again}");
        // The pod's resolvers, as the engine wrote them for it.
        let (_, resolv) = exec_sync(&mut c, &created, &["cat", "/etc/resolv.conf"]).await;
        assert!(
            resolv.contains("nameserver 10.77.0.53") && resolv.contains("svc.banger.test"),
            "{resolv}"
        );
        // And the guest reaches the pod's gateway (the CNI bridge).
        let (code, out) = exec_sync(
            &mut c,
            &created,
            &["busybox", "ping", "-c", "1", "-W", "5", "10.77.0.1"],
        )
        .await;
        assert_eq!(code, 0, "ping of the gateway from the pod: {out}");

        stop_and_remove(&mut c, ctrd, &pod).await;
    });
    wait_for("the pod's VM to go", Duration::from_secs(30), || {
        vms(&env).is_empty().then_some(())
    });
    wait_for("the pod's shim to exit", Duration::from_secs(30), || {
        ctrd.shims("").is_empty().then_some(())
    });
    assert!(env.vm_processes().is_empty(), "VMM processes left");
    // No tap anywhere: not in the helper's namespace, and the pod's
    // namespace itself is gone with the pod.
    let taps = env.ip_in_helper_ns(&["-o", "link", "show", "type", "tun"]);
    assert!(String::from_utf8_lossy(&taps.stdout).trim().is_empty());
    let left: Vec<_> = namespaces().into_iter().filter(|n| !before.contains(n)).collect();
    assert!(left.is_empty(), "pod namespaces left: {left:?}");
}
