//! SSH with the system OpenSSH client, the whole stack inside a network
//! namespace the test creates: the managed key, host keys pinned on first
//! use in banger's own known_hosts, `banger vm ssh`, and `ssh NAME.vm`
//! through the installed ssh-config (ProxyCommand resolving via banger's
//! DNS server).

use banger_tests::Env;

#[test]
fn ssh_name_vm_works_through_the_installed_config_and_pins_host_keys() {
    let env = Env::with_image_in_netns();
    env.create_small("shell", &[]);
    let ip = env.guest_ip("shell");
    assert_eq!(env.dig("shell.vm"), ip, "dig @banger-dns shell.vm");

    // banger vm ssh uses the managed key and the pinned host key.
    assert_eq!(
        env.banger_ok(&["vm", "ssh", "shell", "--", "hostname"]).trim(),
        "shell"
    );
    let known_hosts = env.home().join("ssh/known_hosts");
    let pins = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(
        pins.contains("shell.vm") && pins.contains(&ip) && pins.contains("ssh-ed25519"),
        "{pins}"
    );
    // The user's own known_hosts is never touched; password login is off.
    let sshd = env.banger_ok(&["vm", "exec", "shell", "--", "sshd", "-T"]);
    assert!(sshd.contains("passwordauthentication no"), "{sshd}");

    // ssh-config --install adds a marked Include; plain `ssh NAME.vm` works.
    let user_config = env.dir.path().join("user-ssh-config");
    std::fs::write(&user_config, "Host example\n  User someone\n").unwrap();
    env.banger_ok(&["ssh-config", "--install", "--file", user_config.to_str().unwrap()]);
    let ssh = |cmd: &str| {
        env.netns_cmd("ssh".as_ref())
            .args([
                "-F",
                user_config.to_str().unwrap(),
                "-o",
                "BatchMode=yes",
                "shell.vm",
                cmd,
            ])
            .output()
            .unwrap()
    };
    let out = ssh("true");
    assert!(
        out.status.success(),
        "ssh shell.vm true: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ssh("hostname").stdout).trim(), "shell");

    // A changed host key fails as a possible MITM.
    let tampered = pins.replace("ssh-ed25519 AAAA", "ssh-ed25519 AAAB");
    std::fs::write(&known_hosts, &tampered).unwrap();
    let out = ssh("true");
    assert!(!out.status.success(), "ssh accepted a changed host key");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Host key verification failed") || err.contains("IDENTIFICATION HAS CHANGED"),
        "{err}"
    );
    std::fs::write(&known_hosts, &pins).unwrap();

    // --uninstall removes only banger's block.
    env.banger_ok(&[
        "ssh-config",
        "--uninstall",
        "--file",
        user_config.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(&user_config).unwrap(),
        "Host example\n  User someone\n"
    );

    // delete removes the VM's pins; the managed key stays.
    env.banger_ok(&["vm", "delete", "shell"]);
    let pins = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(!pins.contains("shell.vm") && !pins.contains(&ip), "{pins}");
    assert!(
        env.home().join("ssh/id_ed25519").exists(),
        "the managed key must never be deleted"
    );
}
