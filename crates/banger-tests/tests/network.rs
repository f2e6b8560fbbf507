//! Networking on real guests, inside the network namespace of each test's
//! root helper: a tap per VM on banger's bridge, static addresses, DNS for
//! `<name>.vm`, guests isolated from each other, rules (anti-spoofing,
//! NAT) that follow the VM and never leak.

use banger_tests::Env;

fn nft_rules(env: &Env) -> String {
    String::from_utf8_lossy(&env.in_helper_ns("nft", &["list", "ruleset"]).stdout).into_owned()
}

fn taps(env: &Env) -> Vec<String> {
    let out = env.in_helper_ns("ip", &["-br", "link"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("bgt"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn guests_are_reachable_on_the_bridge_and_named_in_dns() {
    let env = Env::with_image();
    env.create_small("web", &[]);
    env.create_small("db", &["--peers"]);
    env.create_small("peer", &["--peers"]);
    let (web, db) = (env.guest_ip("web"), env.guest_ip("db"));
    assert_ne!(web, db, "two VMs got the same address");
    assert!(web.starts_with("172.30.0."), "{web}");

    // The guest configured itself statically from the command line.
    let addr = env.banger_ok(&["vm", "exec", "web", "--", "ip", "-br", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("{web}/24")), "{addr}");
    // Reachable from the host side of the bridge.
    let ping = env.in_helper_ns("busybox", &["ping", "-c", "1", "-W", "5", &web]);
    assert!(
        ping.status.success(),
        "host -> guest ping failed: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // Guests are isolated from each other unless both have --peers, and
    // reach the host only for what banger serves them (here: ping to the
    // gateway).
    let to_db = env.banger(&["vm", "exec", "web", "--", "ping", "-c", "1", "-W", "2", &db]);
    assert!(
        !to_db.status.success(),
        "web reached db: VM-to-VM traffic is not off"
    );
    env.banger_ok(&["vm", "exec", "peer", "--", "ping", "-c", "1", "-W", "5", &db]);
    env.banger_ok(&[
        "vm",
        "exec",
        "web",
        "--",
        "ping",
        "-c",
        "1",
        "-W",
        "5",
        "172.30.0.1",
    ]);

    assert_eq!(env.dig("web.vm"), web);
    assert_eq!(env.dig("DB.vm."), db);
    assert_eq!(env.dig("nosuch.vm"), "");

    env.banger_ok(&["vm", "stop", "web"]);
    assert_eq!(env.dig("web.vm"), "", "a stopped VM must not resolve");
    assert_eq!(taps(&env).len(), 2, "stop must remove the tap: {:?}", taps(&env));
    env.banger_ok(&["vm", "start", "web"]);
    assert_eq!(env.dig("web.vm"), web, "the address is kept across restarts");

    env.banger_ok(&["vm", "delete", "web"]);
    env.banger_ok(&["vm", "delete", "db"]);
    env.banger_ok(&["vm", "delete", "peer"]);
    assert!(taps(&env).is_empty(), "taps left: {:?}", taps(&env));
    assert!(
        !nft_rules(&env).contains("banger:"),
        "rules left: {}",
        nft_rules(&env)
    );
}

#[test]
fn nat_rules_exist_only_for_nat_vms_and_never_leak() {
    let env = Env::with_image();
    env.create_small("out", &["--nat"]);
    env.create_small("in", &[]);
    let (out_ip, in_ip) = (env.guest_ip("out"), env.guest_ip("in"));
    let rules = nft_rules(&env);
    let masquerades: Vec<&str> = rules.lines().filter(|l| l.contains("masquerade")).collect();
    assert!(
        masquerades.len() == 1 && masquerades[0].contains(&format!("ip saddr {out_ip}")),
        "{rules}"
    );
    // Both are confined to their taps; only `out` is marked for NAT.
    for ip in [&out_ip, &in_ip] {
        assert!(
            rules.contains(&format!("ip saddr {ip} ")),
            "no anti-spoofing for {ip}: {rules}"
        );
    }
    let in_rules: Vec<&str> = rules
        .lines()
        .filter(|l| l.contains(&format!("ip={in_ip} ")))
        .collect();
    assert!(
        in_rules
            .iter()
            .all(|l| !l.contains("mark") && l.contains("nat=0")),
        "a VM without --nat got NAT: {in_rules:?}"
    );

    // Crash the daemon and kill the NAT VM behind its back: after the
    // restart its rules and tap are gone and DNS answers again.
    let out_pid = env.vm("out")["pid"].as_u64().unwrap();
    let (out_id, in_id) = (
        env.vm("out")["id"].as_str().unwrap().to_string(),
        env.vm("in")["id"].as_str().unwrap().to_string(),
    );
    env.kill_daemon();
    // SAFETY: the VMM this test started.
    unsafe { libc::kill(out_pid as i32, libc::SIGKILL) };
    env.banger_ok(&["vm", "list"]);
    assert_eq!(env.vm("out")["state"], "stopped");
    let rules = nft_rules(&env);
    assert!(
        !rules.contains(&format!("banger:{out_id}")) && !rules.contains("masquerade"),
        "guest rules leaked after the crash: {rules}"
    );
    assert!(
        rules.contains(&format!("banger:{in_id}")),
        "the running VM lost its rules: {rules}"
    );
    assert_eq!(taps(&env).len(), 1, "the dead VM's tap leaked: {:?}", taps(&env));
    assert_eq!(env.dig("in.vm"), in_ip, "DNS did not come back");

    // --rm with --nat leaves no VM, tap, rule or file.
    let out = env.banger(&["vm", "run", "--rm", "--nat", "--name", "gone", "--", "true"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    env.banger_ok(&["vm", "delete", "out"]);
    env.banger_ok(&["vm", "delete", "in"]);
    assert!(!nft_rules(&env).contains("banger:"));
    assert!(taps(&env).is_empty(), "{:?}", taps(&env));
    assert!(env.vm_processes().is_empty());
}
