//! Guest output of any size reaches the host intact: a guest→host vsock
//! stream used to stall after 256 KiB under QEMU (the userspace vsock
//! device never returned the guest's send credit), hanging the command.

use banger_tests::Env;

#[test]
fn a_hundred_mebibytes_of_guest_output_arrive_intact() {
    let env = Env::with_image();
    env.banger_ok(&[
        "vm",
        "create",
        "--name",
        "out",
        "--vcpus",
        "1",
        "--memory",
        "512",
        "--disk-size",
        "256",
    ]);
    let guest_sum = env.banger_ok(&[
        "vm",
        "exec",
        "out",
        "--",
        "sh",
        "-c",
        "head -c 104857600 /dev/urandom > /root/r && sha256sum /root/r | cut -d' ' -f1",
    ]);
    let received = env.dir.path().join("received");
    let status = env
        .cmd("banger")
        .args(["vm", "exec", "out", "--", "cat", "/root/r"])
        .stdout(std::fs::File::create(&received).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "vm exec cat failed: {status}");
    assert_eq!(
        std::fs::metadata(&received).unwrap().len(),
        104_857_600,
        "bytes received"
    );
    let sum = std::process::Command::new("sha256sum")
        .arg(&received)
        .output()
        .unwrap();
    let host_sum = String::from_utf8_lossy(&sum.stdout);
    assert_eq!(host_sum.split_whitespace().next(), Some(guest_sum.trim()));
    env.banger_ok(&["vm", "delete", "out"]);
}
