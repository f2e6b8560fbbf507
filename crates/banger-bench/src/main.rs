//! `banger-bench`: each benchmark measures banger and a baseline in the
//! same run, alternating them, and prints medians and their ratio.
//!
//!   banger-bench create-flat   VM create with a 1 GiB vs an 8 GiB image
//!   banger-bench run-vs-qemu   `vm run --rm -- true` vs a hand-made QEMU boot
//!   banger-bench guest-output  guest→host (`vm exec cat`) vs host→guest
//!                              (workspace copy) of the same file
//!   banger-bench chaos         random lifecycle commands while bangerd,
//!                              the helper, a VMM or the client is killed;
//!                              checks the invariants after each round
//!   banger-bench fc-start      `vm start` of a tiny guest vs configuring
//!                              firecracker by hand (needs --firecracker)
//!   banger-bench ctr-run       `ctr run --rm` through containerd and the
//!                              banger shim vs `banger vm run --rm` of the
//!                              same image (needs containerd and ctr)
//!   banger-bench warm-run      `vm run --rm -- true` taking a VM from the
//!                              warm pool vs booting one
//!   banger-bench fc-parallel   50 tiny guests started at once (VMs/s) vs
//!                              as many firecracker processes by hand
//!
//! It drives the release or debug binaries next to itself with a private
//! BANGER_HOME (default target/bench-home, kept so the image is built once).

mod chaos;
mod fc_restore;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    /// Iterations per side.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    CreateFlat,
    RunVsQemu,
    WarmRun,
    CtrRun,
    /// Workspace copy of a generated repo vs `git archive HEAD | ssh tar -x`.
    WorkspaceCopy {
        #[arg(long, default_value_t = 10_000)]
        files: usize,
        #[arg(long, default_value_t = 200)]
        megabytes: usize,
        /// "text" (source-like, compressible, as real repositories are) or
        /// "random" (incompressible: the worst case).
        #[arg(long, default_value = "text")]
        content: String,
    },
    /// `vm cp` both ways against scp, and `vm exec -- true` against ssh.
    CopyExec {
        #[arg(long, default_value_t = 200)]
        megabytes: usize,
    },
    /// A command's output and input streamed through `vm exec` against the
    /// same over ssh: `vm exec -- cat /dev/zero | head -c N` and
    /// `head -c N /dev/zero | vm exec -i -- wc -c`.
    ExecStream {
        #[arg(long, default_value_t = 1024)]
        megabytes: usize,
    },
    /// Guest→host throughput (`vm exec -- cat FILE`) against host→guest
    /// (`vm workspace prepare` of a repo holding that file).
    GuestOutput {
        #[arg(long, default_value_t = 64)]
        megabytes: usize,
    },
    /// Kill -9 of bangerd, the helper, a VMM or the client at random
    /// moments of random lifecycle commands; invariants after each round.
    Chaos {
        #[arg(long, default_value_t = 100)]
        rounds: usize,
        /// Replays a run (printed at its start).
        #[arg(long)]
        seed: Option<u64>,
    },
    FcStart {
        #[arg(long, env = "BANGER_TEST_FIRECRACKER")]
        firecracker: PathBuf,
    },
    /// Many tiny Firecracker guests started at once (VMs per second)
    /// against as many firecracker processes configured by hand at once.
    FcParallel {
        #[arg(long, env = "BANGER_TEST_FIRECRACKER")]
        firecracker: PathBuf,
        #[arg(long, default_value_t = 50)]
        count: usize,
    },
    /// A tiny Firecracker guest snapshotted and restored through banger
    /// against Firecracker's snapshot API by hand.
    FcRestore {
        #[arg(long, env = "BANGER_TEST_FIRECRACKER")]
        firecracker: PathBuf,
    },
}

struct Bench {
    bin: PathBuf,
    home: PathBuf,
    env: Vec<(String, String)>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(name: &str, a_name: &str, a: Vec<Duration>, b_name: &str, b: Vec<Duration>) {
    let (ma, mb) = (median(a.clone()), median(b.clone()));
    println!("{name}");
    println!(
        "  {a_name:<40} median {:>9.1} ms  (runs: {:?})",
        ms(ma),
        a.iter().map(|d| ms(*d).round()).collect::<Vec<_>>()
    );
    println!(
        "  {b_name:<40} median {:>9.1} ms  (runs: {:?})",
        ms(mb),
        b.iter().map(|d| ms(*d).round()).collect::<Vec<_>>()
    );
    println!(
        "  ratio {a_name} / {b_name} = {:.3}   difference = {:+.1} ms",
        ma.as_secs_f64() / mb.as_secs_f64(),
        ms(ma) - ms(mb)
    );
}

impl Bench {
    fn banger(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(self.bin.join("banger"))
            .env("BANGER_HOME", &self.home)
            .env("BANGER_RUNTIME_DIR", self.home.join("run"))
            .env("BANGER_HELPER_SOCKET", self.home.join("helper.sock"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("banger {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn timed(&self, args: &[&str]) -> Result<Duration> {
        let t = Instant::now();
        self.banger(args)?;
        Ok(t.elapsed())
    }

    fn default_image(&self) -> Result<Value> {
        eprintln!("(building or reusing the default image)");
        Ok(serde_json::from_str(
            &self.banger(&["image", "build", "--json"])?,
        )?)
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("{cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// A sparse copy of `src` grown to `size` (ext4 resized in place).
fn sized_copy(src: &str, dst: &Path, size: &str) -> Result<()> {
    run(Command::new("cp").arg("--sparse=always").arg(src).arg(dst))?;
    run(Command::new("truncate").arg("-s").arg(size).arg(dst))?;
    run(Command::new("e2fsck")
        .args(["-fy"])
        .arg(dst)
        .stdout(Stdio::null()))?;
    run(Command::new("resize2fs")
        .arg(dst)
        .stdout(Stdio::null())
        .stderr(Stdio::null()))?;
    Ok(())
}

fn create_flat(b: &Bench, runs: usize) -> Result<()> {
    let img = b.default_image()?;
    let rootfs = img["rootfs"].as_str().unwrap();
    let kernel = img["kernel"].as_str().unwrap();
    let dir = b.home.join("bench-images");
    std::fs::create_dir_all(&dir)?;
    for (name, size) in [("img1g", "1G"), ("img8g", "8G")] {
        let p = dir.join(format!("{name}.ext4"));
        if !p.exists() {
            sized_copy(rootfs, &p, size)?;
        }
        let _ = b.banger(&["image", "delete", name]);
        b.banger(&[
            "image",
            "register",
            name,
            "--rootfs",
            p.to_str().unwrap(),
            "--kernel",
            kernel,
        ])?;
    }
    let (mut small, mut big) = (vec![], vec![]);
    for i in 0..runs {
        for (name, acc) in [("img1g", &mut small), ("img8g", &mut big)] {
            let vm = format!("bench-{name}-{i}");
            acc.push(b.timed(&["vm", "create", "--no-start", "--name", &vm, "--image", name])?);
            b.banger(&["vm", "delete", &vm])?;
        }
    }
    report(
        "vm create (no start) with an 8 GiB vs a 1 GiB image",
        "8 GiB image",
        big,
        "1 GiB image",
        small,
    );
    Ok(())
}

/// Boots the same kernel, initramfs and rootfs with a QEMU command written
/// out by hand, to the same point banger waits for: the agent answering on
/// vsock. Disks are prepared outside the timed region.
async fn raw_qemu_boot(kernel: &Path, initrd: &Path, rootfs: &str, work: &Path) -> Result<Duration> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    for (f, size) in [("overlay.ext4", "4G"), ("work.ext4", "8G")] {
        run(Command::new("truncate").arg("-s").arg(size).arg(work.join(f)))?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(work.join(f)))?;
    }
    let mhz: f64 = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1)?.trim().parse().ok())
        .unwrap_or(2000.0);
    let vhost = work.join("vhost.sock");
    let uds = work.join("vsock.sock");
    let t = Instant::now();
    let mut v = Command::new("vhost-device-vsock")
        .args(["--guest-cid", "3", "--socket"])
        .arg(&vhost)
        .arg("--uds-path")
        .arg(&uds)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    while !vhost.exists() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let d = |f: &str| work.join(f).display().to_string();
    let mut q = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=on,memory-backend=mem",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "1024M",
        ])
        .args(["-object", "memory-backend-memfd,id=mem,size=1024M,share=on"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "null",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 banger.hostname=raw tsc_early_khz={}",
            (mhz * 1000.0) as u64
        ))
        .args([
            "-drive",
            &format!("id=base,file={rootfs},format=raw,if=none,readonly=on"),
            "-device",
            "virtio-blk-device,drive=base",
        ])
        .args([
            "-drive",
            &format!("id=ovl,file={},format=raw,if=none", d("overlay.ext4")),
            "-device",
            "virtio-blk-device,drive=ovl",
        ])
        .args([
            "-drive",
            &format!("id=work,file={},format=raw,if=none", d("work.ext4")),
            "-device",
            "virtio-blk-device,drive=work",
        ])
        .args([
            "-chardev",
            &format!("socket,id=vs,path={}", vhost.display()),
            "-device",
            "vhost-user-vsock-device,chardev=vs",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let ready = banger_vmm::vsock::connect_with_retry(&uds, 52, Duration::from_secs(120), || true).await;
    let elapsed = t.elapsed();
    let _ = q.kill();
    let _ = v.kill();
    let _ = q.wait();
    let _ = v.wait();
    ready?;
    Ok(elapsed)
}

async fn run_vs_qemu(b: &Bench, runs: usize) -> Result<()> {
    let img = b.default_image()?;
    let kdir = PathBuf::from(img["kernel"].as_str().unwrap());
    let rootfs = img["rootfs"].as_str().unwrap().to_string();
    // Warm-up: builds the initramfs banger boots with, reused as the baseline's.
    b.banger(&["vm", "run", "--rm", "--", "true"])?;
    let initrd = std::fs::read_dir(&kdir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().unwrap().to_string_lossy().starts_with("initramfs-")
                && p.extension().is_some_and(|e| e == "cpio")
        })
        .context("no initramfs")?;
    let work = b.home.join("raw-qemu");
    let (mut banger, mut raw) = (vec![], vec![]);
    for _ in 0..runs {
        banger.push(b.timed(&["vm", "run", "--rm", "--", "true"])?);
        raw.push(raw_qemu_boot(&kdir.join("vmlinuz"), &initrd, &rootfs, &work).await?);
    }
    let _ = std::fs::remove_dir_all(&work);
    report(
        "boot to a command, QEMU/TCG",
        "banger vm run --rm -- true",
        banger,
        "raw qemu to agent-ready",
        raw,
    );
    Ok(())
}

/// `vm run --rm -- true` from a warm pool of one against a cold one, in
/// the same run. The pool is full before each warm run (its refill after
/// the previous take is not timed), as it is for a user whose runs are
/// further apart than a boot.
fn warm_run(b: &mut Bench, runs: usize) -> Result<()> {
    b.default_image()?;
    let restart = |b: &mut Bench, pool: &str| -> Result<()> {
        let _ = b.banger(&["daemon", "stop"]);
        b.env = vec![("BANGER_WARM_POOL".into(), pool.into())];
        b.banger(&["ping"])?;
        Ok(())
    };
    restart(b, "0")?;
    // Warm-up: the initramfs and the disk templates are made once.
    b.banger(&["vm", "run", "--rm", "--", "true"])?;
    let mut cold = vec![];
    for _ in 0..runs {
        cold.push(b.timed(&["vm", "run", "--rm", "--", "true"])?);
    }
    restart(b, "1")?;
    let mut warm = vec![];
    for _ in 0..runs {
        b.banger(&["pool", "fill", "--wait"])?;
        warm.push(b.timed(&["vm", "run", "--rm", "--", "true"])?);
    }
    b.banger(&["pool", "drain"])?;
    restart(b, "0")?;
    report(
        "vm run --rm -- true, QEMU/TCG",
        "from the warm pool",
        warm,
        "cold (a boot)",
        cold,
    );
    Ok(())
}

/// Start latency through containerd and the shim against banger's own
/// `vm run`, of the same image (the one the shim made from the
/// container's layers), with no network on either side.
fn ctr_run(b: &Bench, runs: usize) -> Result<()> {
    use banger_tests::containerd::{oci_archive, Containerd, RUNTIME};
    b.default_image()?;
    let dir = b.home.join("containerd");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let p = |p: PathBuf| p.display().to_string();
    let mut env = vec![
        ("BANGER_HOME".to_string(), p(b.home.clone())),
        ("BANGER_RUNTIME_DIR".to_string(), p(b.home.join("run"))),
        ("BANGER_HELPER_SOCKET".to_string(), p(b.home.join("helper.sock"))),
        ("BANGER_HELPER_AUTOSTART".to_string(), "0".to_string()),
    ];
    env.extend(b.env.iter().cloned());
    let ctrd = Containerd::start(&dir, &env);
    let image = "docker.io/banger/bench:latest";
    let archive = dir.join("image.tar");
    std::fs::write(&archive, oci_archive(image))?;
    ctrd.ctr_ok(&["image", "import", archive.to_str().unwrap()]);
    // Warm-up: the shim makes (and registers) the image once.
    ctrd.ctr_ok(&["run", "--rm", "--runtime", RUNTIME, image, "warm", "true"]);
    let images: Value = serde_json::from_str(&b.banger(&["image", "list", "--json"])?)?;
    let name = images
        .as_array()
        .and_then(|a| {
            a.iter()
                .find_map(|i| i["name"].as_str().filter(|n| n.starts_with("ctr-")))
        })
        .context("the shim registered no image")?
        .to_string();
    let (mut via_ctr, mut direct) = (vec![], vec![]);
    for i in 0..runs {
        let t = Instant::now();
        ctrd.ctr_ok(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            image,
            &format!("b{i}"),
            "true",
        ]);
        via_ctr.push(t.elapsed());
        direct.push(b.timed(&[
            "vm",
            "run",
            "--rm",
            "--no-network",
            "--image",
            &name,
            "--",
            "true",
        ])?);
    }
    report(
        "container start to exit, QEMU/TCG",
        "ctr run --rm (containerd + shim)",
        via_ctr,
        "banger vm run --rm, same image",
        direct,
    );
    Ok(())
}

/// A git repository of `files` files totalling `mb` MiB of incompressible
/// content, spread over 100 directories (kept between runs).
fn make_repo(dir: &Path, files: usize, mb: usize, random: bool) -> Result<()> {
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

async fn workspace_copy(b: &Bench, runs: usize, files: usize, mb: usize, random: bool) -> Result<()> {
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
fn ssh_to(b: &Bench, name: &str) -> Result<(String, String)> {
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
fn copy_and_exec(b: &Bench, runs: usize, mb: usize) -> Result<()> {
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
fn exec_stream(b: &Bench, runs: usize, mb: usize) -> Result<()> {
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
fn guest_output(b: &Bench, runs: usize, mb: usize) -> Result<()> {
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

/// The tiny vsock guest as image `tiny` (its kernel, an empty rootfs):
/// the guest and the rootfs paths.
fn tiny_image(b: &Bench) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../banger-tests/fixtures/fc-tiny-guests");
    let guest = fixtures.join("vsockguest.elf");
    let kdir = b.home.join("tiny-kernel");
    std::fs::create_dir_all(&kdir)?;
    std::fs::copy(&guest, kdir.join("vsockguest.elf"))?;
    std::fs::copy(&guest, kdir.join("vmlinuz"))?;
    let manifest = serde_json::json!({"version":"tiny","dir":kdir.display().to_string(),"package":"fixture","sha256":"","source":"fixture","modules":[],"vmlinux":"vsockguest.elf"});
    std::fs::write(kdir.join("manifest.json"), manifest.to_string())?;
    let rootfs = b.home.join("tiny-rootfs.ext4");
    run(Command::new("truncate").arg("-s").arg("16M").arg(&rootfs))?;
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&rootfs))?;
    let _ = b.banger(&["image", "delete", "tiny"]);
    b.banger(&[
        "image",
        "register",
        "tiny",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        kdir.to_str().unwrap(),
    ])?;
    Ok((guest, kdir, rootfs))
}

/// A stopped VM of the tiny image, as small as banger makes one.
fn tiny_vm(b: &Bench, name: &str) -> Result<()> {
    b.banger(&[
        "vm",
        "create",
        "--no-start",
        "--name",
        name,
        "--image",
        "tiny",
        "--vcpus",
        "1",
        "--memory",
        "128",
        "--disk-size",
        "64",
        "--no-network",
    ])?;
    Ok(())
}

async fn fc_start(b: &Bench, runs: usize, fc: &Path) -> Result<()> {
    let _ = b.banger(&["vm", "delete", "fcbench"]);
    let (guest, kdir, rootfs) = tiny_image(b)?;
    tiny_vm(b, "fcbench")?;
    let vm: Value = serde_json::from_str(&b.banger(&["vm", "show", "fcbench", "--json"])?)?;
    let vm_dir = PathBuf::from(vm["vm_dir"].as_str().unwrap());
    // The initramfs banger passes, so both sides load the same bytes.
    b.banger(&["vm", "start", "fcbench"])?;
    b.banger(&["vm", "kill", "fcbench"])?;
    let initrd = std::fs::read_dir(&kdir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cpio"))
        .context("no initramfs")?;
    let raw_dir = b.home.join("raw-fc");
    std::fs::create_dir_all(&raw_dir)?;
    let (mut banger, mut raw) = (vec![], vec![]);
    // Time the daemon's vm.start RPC itself: the CLI's own process start is
    // not what this compares.
    let client = banger_proto::Client::new(b.home.join("run/bangerd.sock"));
    let target = banger_proto::methods::daemon::VmRef {
        name: "fcbench".into(),
    };
    for _ in 0..runs {
        let t = Instant::now();
        client
            .call::<banger_proto::methods::daemon::VmStart>(&target, None)
            .await?;
        banger.push(t.elapsed());
        b.banger(&["vm", "kill", "fcbench"])?;
        raw.push(raw_fc(fc, &guest, &initrd, &rootfs, &vm_dir, &raw_dir, 3).await?);
    }
    b.banger(&["vm", "delete", "fcbench"])?;
    report(
        "Firecracker start of a tiny guest to vsock-ready",
        "banger vm.start RPC",
        banger,
        "firecracker configured by hand",
        raw,
    );
    Ok(())
}

async fn raw_fc(
    fc: &Path,
    guest: &Path,
    initrd: &Path,
    rootfs: &Path,
    vm_dir: &Path,
    dir: &Path,
    cid: u32,
) -> Result<Duration> {
    use banger_vmm::firecracker::request;
    let api = dir.join("api.sock");
    let vs = dir.join("v.sock");
    let _ = std::fs::remove_file(&api);
    let _ = std::fs::remove_file(&vs);
    let t = Instant::now();
    let mut child = Command::new(fc)
        .arg("--api-sock")
        .arg(&api)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    while tokio::net::UnixStream::connect(&api).await.is_err() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let s = |p: &Path| p.display().to_string();
    let calls = [
        (
            "/machine-config",
            serde_json::json!({"vcpu_count":1,"mem_size_mib":128}),
        ),
        (
            "/boot-source",
            serde_json::json!({"kernel_image_path":s(guest),"initrd_path":s(initrd),"boot_args":"console=ttyS0"}),
        ),
        (
            "/drives/base",
            serde_json::json!({"drive_id":"base","path_on_host":s(rootfs),"is_root_device":false,"is_read_only":true}),
        ),
        (
            "/drives/overlay",
            serde_json::json!({"drive_id":"overlay","path_on_host":s(&vm_dir.join("overlay.ext4")),"is_root_device":false,"is_read_only":false}),
        ),
        (
            "/drives/work",
            serde_json::json!({"drive_id":"work","path_on_host":s(&vm_dir.join("work.ext4")),"is_root_device":false,"is_read_only":false}),
        ),
        ("/vsock", serde_json::json!({"guest_cid":cid,"uds_path":s(&vs)})),
        ("/actions", serde_json::json!({"action_type":"InstanceStart"})),
    ];
    for (path, body) in calls {
        let (st, b) = request(&api, "PUT", path, Some(&body)).await?;
        if !(200..300).contains(&st) {
            bail!("PUT {path}: {st} {b}");
        }
    }
    let ready = banger_vmm::vsock::connect_with_retry(&vs, 52, Duration::from_secs(10), || true).await;
    let elapsed = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    ready?;
    Ok(elapsed)
}

/// `count` tiny Firecracker guests started at once through the daemon
/// (`vm.start` RPCs in flight together) against as many firecracker
/// processes configured by hand at once: VMs per second to vsock-ready.
async fn fc_parallel(b: &Bench, count: usize, fc: &Path) -> Result<()> {
    let names: Vec<String> = (0..count).map(|i| format!("par-{i}")).collect();
    for n in &names {
        let _ = b.banger(&["vm", "delete", n]);
    }
    let (guest, kdir, rootfs) = tiny_image(b)?;
    for n in &names {
        tiny_vm(b, n)?;
    }
    // Warm-up: the initramfs both sides load.
    b.banger(&["vm", "start", &names[0]])?;
    b.banger(&["vm", "kill", &names[0]])?;
    let initrd = std::fs::read_dir(&kdir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cpio"))
        .context("no initramfs")?;
    let client = banger_proto::Client::new(b.home.join("run/bangerd.sock"));
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for n in names.clone() {
        let c = client.clone();
        set.spawn(async move {
            c.call::<banger_proto::methods::daemon::VmStart>(
                &banger_proto::methods::daemon::VmRef { name: n },
                None,
            )
            .await
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let banger = t.elapsed();
    for n in &names {
        b.banger(&["vm", "kill", n])?;
    }
    let mut dirs = vec![];
    for n in &names {
        let vm: Value = serde_json::from_str(&b.banger(&["vm", "show", n, "--json"])?)?;
        dirs.push(PathBuf::from(vm["vm_dir"].as_str().unwrap()));
    }
    let raw_root = b.home.join("raw-fc-parallel");
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, vm_dir) in dirs.into_iter().enumerate() {
        let (fc, guest, initrd, rootfs) = (fc.to_path_buf(), guest.clone(), initrd.clone(), rootfs.clone());
        let dir = raw_root.join(i.to_string());
        std::fs::create_dir_all(&dir)?;
        set.spawn(async move { raw_fc(&fc, &guest, &initrd, &rootfs, &vm_dir, &dir, 3 + i as u32).await });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let raw = t.elapsed();
    let _ = std::fs::remove_dir_all(&raw_root);
    for n in &names {
        b.banger(&["vm", "delete", n])?;
    }
    let rate = |d: Duration| count as f64 / d.as_secs_f64();
    println!("{count} tiny Firecracker guests started at once, to vsock-ready");
    println!(
        "  banger (vm.start RPCs together)  {:>8.1} ms  {:>6.1} VMs/s",
        ms(banger),
        rate(banger)
    );
    println!(
        "  firecracker by hand, together    {:>8.1} ms  {:>6.1} VMs/s",
        ms(raw),
        rate(raw)
    );
    println!(
        "  ratio banger / by hand = {:.3}",
        banger.as_secs_f64() / raw.as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let bin = std::env::current_exe()?.parent().unwrap().to_path_buf();
    let home = cli.home.unwrap_or_else(|| bin.join("../bench-home"));
    std::fs::create_dir_all(&home)?;
    let home = home.canonicalize()?;
    let mut b = Bench {
        bin,
        home,
        env: vec![],
    };
    match cli.cmd {
        Cmd::CreateFlat => create_flat(&b, cli.runs)?,
        Cmd::RunVsQemu => run_vs_qemu(&b, cli.runs).await?,
        Cmd::WarmRun => warm_run(&mut b, cli.runs)?,
        Cmd::CtrRun => ctr_run(&b, cli.runs)?,
        Cmd::WorkspaceCopy {
            files,
            megabytes,
            content,
        } => workspace_copy(&b, cli.runs, files, megabytes, content == "random").await?,
        Cmd::Chaos { rounds, seed } => {
            chaos::run(&b.bin, &b.home, rounds, seed)?;
            return Ok(());
        }
        Cmd::GuestOutput { megabytes } => guest_output(&b, cli.runs, megabytes)?,
        Cmd::CopyExec { megabytes } => copy_and_exec(&b, cli.runs, megabytes)?,
        Cmd::ExecStream { megabytes } => exec_stream(&b, cli.runs, megabytes)?,
        Cmd::FcStart { firecracker } => {
            b.env = vec![
                ("BANGER_VMM".into(), "firecracker".into()),
                ("BANGER_FIRECRACKER".into(), firecracker.display().to_string()),
            ];
            // A daemon started with another back-end would not see these settings.
            let _ = b.banger(&["daemon", "stop"]);
            tokio::time::sleep(Duration::from_millis(300)).await;
            fc_start(&b, cli.runs, &firecracker).await?
        }
        Cmd::FcRestore { firecracker } => {
            b.env = vec![
                ("BANGER_VMM".into(), "firecracker".into()),
                ("BANGER_FIRECRACKER".into(), firecracker.display().to_string()),
            ];
            let _ = b.banger(&["daemon", "stop"]);
            tokio::time::sleep(Duration::from_millis(300)).await;
            fc_restore::fc_restore(&b, cli.runs, &firecracker).await?
        }
        Cmd::FcParallel { firecracker, count } => {
            b.env = vec![
                ("BANGER_VMM".into(), "firecracker".into()),
                ("BANGER_FIRECRACKER".into(), firecracker.display().to_string()),
            ];
            let _ = b.banger(&["daemon", "stop"]);
            tokio::time::sleep(Duration::from_millis(300)).await;
            fc_parallel(&b, count, &firecracker).await?
        }
    }
    let _ = b.banger(&["daemon", "stop"]);
    Ok(())
}
