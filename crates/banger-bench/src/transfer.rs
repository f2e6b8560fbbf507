//! Moving bytes: `workspace-copy`, `copy-exec` (against scp and ssh),
//! `exec-stream` (against ssh) and `guest-output`.

use crate::{median, report, run, Bench};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A git repository of `files` files totalling `mb` MiB of incompressible
/// content, spread over 100 directories (kept between runs).
pub(crate) fn make_repo(dir: &Path, files: usize, mb: usize, random: bool) -> Result<()> {
    if dir.join(".git").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let per = mb * 1024 * 1024 / files;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..files {
        let sub = dir.join(format!("d{:02}", i % 100));
        std::fs::create_dir_all(&sub)?;
        let mut data = Vec::with_capacity(per);
        while data.len() < per {
            // xorshift: cheap, incompressible enough for git's zlib.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if random {
                data.extend_from_slice(&state.to_le_bytes());
            } else {
                let line = format!(
                    "    let value_{:x} = compute(input_{}, {});\n",
                    state & 0xffff,
                    state % 97,
                    state % 1000
                );
                data.extend_from_slice(line.as_bytes());
            }
        }
        data.truncate(per);
        std::fs::write(sub.join(format!("f{i:05}.bin")), data)?;
    }
    let git = |args: &[&str]| {
        run(Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stdout(Stdio::null()))
    };
    git(&["init", "-q"])?;
    git(&["add", "."])?;
    git(&[
        "-c",
        "user.name=bench",
        "-c",
        "user.email=bench@example.com",
        "commit",
        "-q",
        "-m",
        "bench",
    ])?;
    Ok(())
}

pub(crate) async fn workspace_copy(
    b: &Bench,
    runs: usize,
    files: usize,
    mb: usize,
    random: bool,
) -> Result<()> {
    b.default_image()?;
    let kind = if random { "random" } else { "text" };
    let repo = b.home.join(format!("bench-repo-{files}-{mb}-{kind}"));
    eprintln!("(generating or reusing {})", repo.display());
    make_repo(&repo, files, mb, random)?;
    let _ = b.banger(&["vm", "delete", "wsbench"]);
    b.banger(&["vm", "create", "--name", "wsbench", "--disk-size", "4096"])?;
    let (ip, opts) = ssh_to(b, "wsbench")?;
    let clean = |path: &str| b.banger(&["vm", "exec", "wsbench", "--cwd", "/", "--", "rm", "-rf", path]);
    let (mut banger, mut baseline) = (vec![], vec![]);
    for _ in 0..runs {
        banger.push(b.timed(&["vm", "workspace", "prepare", "wsbench", repo.to_str().unwrap()])?);
        clean("/root/repo")?;
        let t = Instant::now();
        let script = format!(
            "git -C {} archive HEAD | ssh {opts} root@{ip} 'mkdir -p /root/base && tar -x -C /root/base'",
            repo.display()
        );
        run(Command::new("bash").args(["-o", "pipefail", "-c", &script]))?;
        baseline.push(t.elapsed());
        clean("/root/base")?;
    }
    b.banger(&["vm", "delete", "wsbench"])?;
    report(
        &format!("workspace copy of {files} files / {mb} MiB ({kind} content)"),
        "banger vm workspace prepare",
        banger,
        "git archive HEAD | ssh tar -x",
        baseline,
    );
    Ok(())
}

/// The guest's address and the ssh options (banger's key, pinned host
/// key) that reach VM `name` with the system ssh/scp.
pub(crate) fn ssh_to(b: &Bench, name: &str) -> Result<(String, String)> {
    let vm: Value = serde_json::from_str(&b.banger(&["vm", "show", name, "--json"])?)?;
    let ip = vm["guest_ip"]
        .as_str()
        .context("the VM has no address")?
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let ssh: Value = serde_json::from_str(&b.banger(&["ssh-info-json"]).unwrap_or_else(|_| "{}".into()))
        .unwrap_or_default();
    let key = ssh["key"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| b.home.join("ssh/id_ed25519").display().to_string());
    let known = b.home.join("ssh/known_hosts").display().to_string();
    Ok((
        ip,
        format!(
            "-i {key} -o IdentitiesOnly=yes -o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes \
             -o HostKeyAlias={name}.vm"
        ),
    ))
}

/// `vm cp` of one incompressible file each way, and the `vm exec -- true`
/// round trip, against scp and ssh to the same guest in the same run.
pub(crate) fn copy_and_exec(b: &Bench, runs: usize, mb: usize) -> Result<()> {
    b.default_image()?;
    let repo = b.home.join(format!("bench-repo-1-{mb}-random"));
    make_repo(&repo, 1, mb, true)?;
    let file = repo.join("d00/f00000.bin");
    let _ = b.banger(&["vm", "delete", "cpbench"]);
    b.banger(&[
        "vm",
        "create",
        "--name",
        "cpbench",
        "--disk-size",
        &(4 * mb + 512).to_string(),
    ])?;
    let (ip, opts) = ssh_to(b, "cpbench")?;
    let back = b.home.join("cpbench-back");
    let (mut cp_in, mut scp_in, mut cp_out, mut scp_out, mut exec, mut ssh) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        cp_in.push(b.timed(&["vm", "cp", file.to_str().unwrap(), "cpbench:/root/in.bin"])?);
        let t = Instant::now();
        run(Command::new("bash").args([
            "-c",
            &format!("scp -q {opts} {} root@{ip}:/root/scp.bin", file.display()),
        ]))?;
        scp_in.push(t.elapsed());
        let _ = std::fs::remove_file(&back);
        cp_out.push(b.timed(&["vm", "cp", "cpbench:/root/in.bin", back.to_str().unwrap()])?);
        if std::fs::metadata(&back)?.len() != (mb as u64) << 20 {
            bail!("vm cp brought back a file of the wrong size");
        }
        let _ = std::fs::remove_file(&back);
        let t = Instant::now();
        run(Command::new("bash").args([
            "-c",
            &format!("scp -q {opts} root@{ip}:/root/scp.bin {}", back.display()),
        ]))?;
        scp_out.push(t.elapsed());
        exec.push(b.timed(&["vm", "exec", "cpbench", "--", "true"])?);
        let t = Instant::now();
        run(Command::new("bash").args(["-c", &format!("ssh {opts} root@{ip} true")]))?;
        ssh.push(t.elapsed());
    }
    let _ = std::fs::remove_file(&back);
    b.banger(&["vm", "delete", "cpbench"])?;
    report(
        &format!("copy of {mb} MiB into the guest"),
        "banger vm cp",
        cp_in,
        "scp",
        scp_in,
    );
    report(
        &format!("copy of {mb} MiB out of the guest"),
        "banger vm cp",
        cp_out,
        "scp",
        scp_out,
    );
    report(
        "command round trip",
        "banger vm exec -- true",
        exec,
        "ssh NAME true",
        ssh,
    );
    Ok(())
}

/// Streams `mb` MiB out of and into a guest command, through `vm exec`
/// and through ssh to the same guest in the same run. Out: an endless
/// producer cut by `head` on the host (which also shows that the guest's
/// `cat` ends when its reader does); in: `wc -c` in the guest.
pub(crate) fn exec_stream(b: &Bench, runs: usize, mb: usize) -> Result<()> {
    b.default_image()?;
    let _ = b.banger(&["vm", "delete", "streambench"]);
    b.banger(&["vm", "create", "--name", "streambench"])?;
    let (ip, opts) = ssh_to(b, "streambench")?;
    let banger = format!(
        "BANGER_HOME={} BANGER_RUNTIME_DIR={} BANGER_HELPER_SOCKET={} {}",
        b.home.display(),
        b.home.join("run").display(),
        b.home.join("helper.sock").display(),
        b.bin.join("banger").display()
    );
    let bytes = (mb as u64) << 20;
    let measure = |script: String| -> Result<Duration> {
        let t = Instant::now();
        let out = Command::new("bash")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .output()?;
        let took = t.elapsed();
        let n: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
        if !out.status.success() || n != bytes {
            bail!(
                "{script}: {n} bytes, {} ({})",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(took)
    };
    let (mut out_b, mut out_s, mut in_b, mut in_s) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        out_b.push(measure(format!(
            "{banger} vm exec streambench -- cat /dev/zero | head -c {bytes} | wc -c"
        ))?);
        out_s.push(measure(format!(
            "ssh {opts} root@{ip} cat /dev/zero | head -c {bytes} | wc -c"
        ))?);
        in_b.push(measure(format!(
            "head -c {bytes} /dev/zero | {banger} vm exec -i streambench -- wc -c"
        ))?);
        in_s.push(measure(format!(
            "head -c {bytes} /dev/zero | ssh {opts} root@{ip} wc -c"
        ))?);
    }
    // The guest's `cat` ended with its reader: nothing is left running.
    let left = b.banger(&[
        "vm",
        "exec",
        "streambench",
        "--",
        "sh",
        "-c",
        "pgrep -c -x cat || true",
    ])?;
    b.banger(&["vm", "delete", "streambench"])?;
    if left.trim() != "0" {
        bail!("{} guest cat process(es) outlived their reader", left.trim());
    }
    let rate = |v: &[Duration]| mb as f64 / median(v.to_vec()).as_secs_f64();
    println!(
        "  out: vm exec {:.1} MiB/s, ssh {:.1} MiB/s; in: vm exec -i {:.1} MiB/s, ssh {:.1} MiB/s",
        rate(&out_b),
        rate(&out_s),
        rate(&in_b),
        rate(&in_s)
    );
    report(
        &format!("{mb} MiB out of a guest command"),
        "vm exec -- cat /dev/zero | head -c N",
        out_b,
        "ssh NAME cat /dev/zero | head -c N",
        out_s,
    );
    report(
        &format!("{mb} MiB into a guest command"),
        "head -c N /dev/zero | vm exec -i -- wc -c",
        in_b,
        "head -c N /dev/zero | ssh NAME wc -c",
        in_s,
    );
    Ok(())
}

/// Moves one incompressible file of `mb` MiB each way through banger.
pub(crate) fn guest_output(b: &Bench, runs: usize, mb: usize) -> Result<()> {
    b.default_image()?;
    let repo = b.home.join(format!("bench-repo-1-{mb}-random"));
    make_repo(&repo, 1, mb, true)?;
    let _ = b.banger(&["vm", "delete", "outbench"]);
    b.banger(&[
        "vm",
        "create",
        "--name",
        "outbench",
        "--disk-size",
        &(4 * mb + 512).to_string(),
    ])?;
    let file = "/root/repo/d00/f00000.bin";
    let (mut out, mut inn) = (vec![], vec![]);
    for _ in 0..runs {
        b.banger(&[
            "vm",
            "exec",
            "outbench",
            "--cwd",
            "/",
            "--",
            "rm",
            "-rf",
            "/root/repo",
        ])?;
        inn.push(b.timed(&["vm", "workspace", "prepare", "outbench", repo.to_str().unwrap()])?);
        let t = Instant::now();
        let got = Command::new(b.bin.join("banger"))
            .env("BANGER_HOME", &b.home)
            .env("BANGER_RUNTIME_DIR", b.home.join("run"))
            .env("BANGER_HELPER_SOCKET", b.home.join("helper.sock"))
            .args(["vm", "exec", "outbench", "--", "cat", file])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()?;
        out.push(t.elapsed());
        if !got.status.success() || got.stdout.len() != mb << 20 {
            bail!("vm exec cat returned {} bytes ({})", got.stdout.len(), got.status);
        }
    }
    b.banger(&["vm", "delete", "outbench"])?;
    let rate = |v: &[Duration]| mb as f64 / median(v.to_vec()).as_secs_f64();
    println!(
        "  guest→host {:.1} MiB/s, host→guest {:.1} MiB/s",
        rate(&out),
        rate(&inn)
    );
    report(
        &format!("moving {mb} MiB of random bytes"),
        "guest→host: vm exec -- cat FILE",
        out,
        "host→guest: vm workspace prepare",
        inn,
    );
    Ok(())
}
