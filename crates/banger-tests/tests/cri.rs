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

/// The host's network, as a kubelet asks for it with `hostNetwork: true`.
fn node_network() -> Option<cri::NamespaceOption> {
    Some(cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        ..Default::default()
    })
}

fn pod_config(logs: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "sandbox".into(),
            uid: "uid-1".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "pod-one".into(),
        log_directory: logs.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: node_network(),
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

#[test]
fn a_pod_through_cri_is_one_vm_and_its_containers_run_inside_it() {
    let env = Env::with_image_in_netns();
    let d = tempfile::Builder::new().prefix("banger-cri").tempdir().unwrap();
    let cni = d.path().join("cni");
    std::fs::create_dir_all(&cni).unwrap();
    let ctrd = Containerd::start_cri(d.path(), &env.banger_env(), PAUSE, &cni);
    for (name, cmd, marker) in [
        (PAUSE, &["sleep", "100000000"][..], "pause"),
        (APP, &["sh"][..], "app"),
    ] {
        let archive = d.path().join(format!("{marker}.tar"));
        std::fs::write(&archive, oci_archive_with(name, cmd, marker)).unwrap();
        let o = ctrd.ctr_in("k8s.io", &["image", "import", archive.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "import: {}",
            banger_tests::containerd::text(&o)
        );
    }
    let logs = d.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();

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
        let config = pod_config(&logs);
        let pod = c
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: "banger".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctrd.log_tail()))
            .into_inner()
            .pod_sandbox_id;
        let pod_vms = vms(&env);
        assert_eq!(pod_vms.len(), 1, "one VM for the pod: {pod_vms:?}");
        let vm = pod_vms[0].clone();
        assert!(vm.starts_with("ct-"), "{vm}");
        assert_eq!(env.vm(&vm)["state"], "running");

        // A container of the pod: a process in the pod's VM, in its own tree.
        let created = c
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: "app".into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: APP.into(),
                        ..Default::default()
                    }),
                    command: vec!["sh".into()],
                    args: vec!["-c".into(), "echo app says $GREETING; exec sleep 100000".into()],
                    envs: vec![cri::KeyValue {
                        key: "GREETING".into(),
                        value: "hello".into(),
                    }],
                    log_path: "app.log".into(),
                    linux: Some(cri::LinuxContainerConfig {
                        security_context: Some(cri::LinuxContainerSecurityContext {
                            namespace_options: node_network(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                sandbox_config: Some(config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", ctrd.log_tail()))
            .into_inner()
            .container_id;
        c.start_container(cri::StartContainerRequest {
            container_id: created.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", ctrd.log_tail()));
        assert_eq!(vms(&env), std::slice::from_ref(&vm), "the container joined the pod's VM");
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
                    .filter(|l| l.contains("app says hello"))
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
                    "cat /etc/banger-image; uname -r; ls /proc/1/ >/dev/null && echo proc; exit 4".into(),
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
        c.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", ctrd.log_tail()));
        c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", ctrd.log_tail()));
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
