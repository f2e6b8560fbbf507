//! Workspaces: a host git work tree copied into a guest.
//!
//! Only tracked files are copied by default (`--include-untracked` adds
//! untracked, non-ignored ones; ignored files never). The guest gets a
//! shallow `.git` holding the host's HEAD commit, so it can commit on top
//! and `export` a patch against that base that applies on the host.

use crate::error::WorkspaceError;
use crate::sys::{self, io};
use banger_proto::methods::agent::{BulkHeader, BulkResult, Line, BULK_CHUNK, BULK_PORT};
use banger_proto::methods::daemon::WorkspacePlan;
use banger_proto::OpId;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// Where workspaces land in the guest.
pub const GUEST_REPO: &str = "/root/repo";
const BOOTSTRAP_FILES: &[&str] = &[".mise.toml", ".tool-versions"];

async fn git(dir: &Path, args: &[&str]) -> Result<String, WorkspaceError> {
    let mut all = vec![
        "-C",
        dir.to_str().ok_or_else(|| WorkspaceError::PathNotUtf8 {
            path: dir.to_path_buf(),
        })?,
    ];
    all.extend_from_slice(args);
    Ok(sys::run("git", all, None).await?)
}

fn nul_list(s: &str) -> Vec<String> {
    s.split('\0')
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Validates the repository and lists what would be copied.
pub async fn plan(path: &str, include_untracked: bool) -> Result<(PathBuf, WorkspacePlan), WorkspaceError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(WorkspaceError::RelativePath { path: path.into() });
    }
    if !p.is_dir() {
        return Err(WorkspaceError::NotADirectory { path: path.into() });
    }
    let bare = git(p, &["rev-parse", "--is-bare-repository"])
        .await
        .map_err(|e| WorkspaceError::NotARepository {
            path: path.into(),
            source: Box::new(e),
        })?;
    if bare.trim() == "true" {
        return Err(WorkspaceError::BareRepository { path: path.into() });
    }
    let root = PathBuf::from(git(p, &["rev-parse", "--show-toplevel"]).await?.trim());
    let staged = git(&root, &["ls-files", "-s", "-z"]).await?;
    if root.join(".gitmodules").exists() || nul_list(&staged).iter().any(|l| l.starts_with("160000 ")) {
        return Err(WorkspaceError::Submodules { root });
    }
    // Tracked files that still exist (a deleted tracked file is not copied).
    let tracked = nul_list(&git(&root, &["ls-files", "-z", "--cached"]).await?);
    // A stat per file (tens of thousands in a big repository) is blocking
    // work: off the async workers.
    let mut files: Vec<String> = tokio::task::block_in_place(|| {
        tracked
            .into_iter()
            .filter(|f| root.join(f).symlink_metadata().is_ok())
            .collect()
    });
    files.dedup();
    let untracked = nul_list(&git(&root, &["ls-files", "-z", "--others", "--exclude-standard"]).await?);
    let skipped_untracked = if include_untracked {
        files.extend(untracked);
        files.sort();
        vec![]
    } else {
        untracked
    };
    let bytes = tokio::task::block_in_place(|| {
        files
            .iter()
            .filter_map(|f| root.join(f).symlink_metadata().ok())
            .map(|m| m.len())
            .sum()
    });
    let base_commit = git(&root, &["rev-parse", "--verify", "-q", "HEAD"])
        .await
        .ok()
        .map(|s| s.trim().to_string());
    let bootstrap_files = BOOTSTRAP_FILES
        .iter()
        .filter(|f| files.iter().any(|x| x == *f))
        .map(|f| f.to_string())
        .collect();
    let plan = WorkspacePlan {
        repo_root: root.display().to_string(),
        files,
        bytes,
        skipped_untracked,
        base_commit,
        bootstrap_files,
    };
    Ok((root, plan))
}

/// A shallow repository holding only the base commit (and `from`, if
/// given), to ship as the guest's `.git`. Its branch is named after the
/// host's current branch and points at the base commit.
pub async fn shallow_git(
    root: &Path,
    work: &Path,
    base: &str,
    extra: Option<&str>,
) -> Result<PathBuf, WorkspaceError> {
    let branch = git(root, &["symbolic-ref", "-q", "--short", "HEAD"])
        .await
        .map(|b| b.trim().to_string())
        .ok()
        .filter(|b| validate_ref(b).is_ok())
        .unwrap_or_else(|| "main".to_string());
    let dir = work.join("shallow");
    sys::run("git", ["init", "-q", "-b", &branch, dir.to_str().unwrap()], None).await?;
    let url = format!("file://{}", root.display());
    for r in std::iter::once(base).chain(extra) {
        git(&dir, &["fetch", "-q", "--depth", "1", &url, r]).await?;
    }
    git(&dir, &["update-ref", &format!("refs/heads/{branch}"), base]).await?;
    Ok(dir.join(".git"))
}

/// Streams the files (and the shallow `.git`) into the guest over the
/// bulk port; returns the guest's verdict.
pub async fn push(
    uds: &Path,
    op: &OpId,
    root: &Path,
    files: &[String],
    dotgit: Option<&Path>,
    dest: &str,
) -> Result<BulkResult, WorkspaceError> {
    let stream =
        banger_vmm::vsock::connect_with_retry(uds, BULK_PORT, std::time::Duration::from_secs(3), || true)
            .await
            .map_err(|source| WorkspaceError::AgentUnreachable { source })?;
    let std_stream = stream.into_std().map_err(io("converting the vsock stream"))?;
    std_stream.set_nonblocking(false).map_err(io("blocking mode"))?;
    let header = BulkHeader {
        op_id: Some(op.to_string()),
        op: "untar".into(),
        dest: dest.to_string(),
        name: None,
    };
    let root = root.to_path_buf();
    let files = files.to_vec();
    let dotgit = dotgit.map(Path::to_path_buf);
    tokio::task::spawn_blocking(move || -> Result<BulkResult, WorkspaceError> {
        let mut s = std_stream;
        s.write_all(&header.to_line()).map_err(io("sending the header"))?;
        {
            let w = std::io::BufWriter::with_capacity(BULK_CHUNK, Chunked(&s));
            let mut tar = tar::Builder::new(w);
            tar.follow_symlinks(false);
            for f in &files {
                tar.append_path_with_name(root.join(f), f)
                    .map_err(io(format!("adding {f}")))?;
            }
            if let Some(g) = &dotgit {
                tar.append_dir_all(".git", g).map_err(io("adding .git"))?;
            }
            let mut w = tar.into_inner().map_err(io("finishing the archive"))?;
            w.flush().map_err(io("sending the archive"))?;
        }
        (&s).write_all(&0u32.to_be_bytes())
            .map_err(io("ending the archive"))?;
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .map_err(io("reading the guest's answer"))?;
        BulkResult::from_line(&line).map_err(|detail| WorkspaceError::BadAnswer {
            line: line.clone(),
            detail,
        })
    })
    .await
    .map_err(|source| WorkspaceError::TransferTask { source })?
}

/// The guest-side shell that finishes a workspace: index = base commit
/// (`read-tree`, not `reset`: no re-hashing of every file in the guest),
/// base recorded for export, optional branch.
pub fn finish_script(branch: Option<&str>, from: Option<&str>) -> String {
    let mut s = format!(
        "set -e; cd {GUEST_REPO}; if [ -d .git ]; then git read-tree HEAD; git rev-parse HEAD > .git/banger-base; fi"
    );
    if let Some(b) = branch {
        match from {
            Some(sha) => s.push_str(&format!("; git switch -q -c '{b}' '{sha}'")),
            None => s.push_str(&format!("; git switch -q -c '{b}'")),
        }
    }
    s
}

/// The guest-side shell that prints a binary patch of everything that
/// changed against the base, using a throwaway index.
pub fn export_script(base: Option<&str>) -> String {
    let base = match base {
        Some(b) => format!("'{b}'"),
        None => "$(cat .git/banger-base)".to_string(),
    };
    format!(
        "set -e; cd {GUEST_REPO}; idx=$(mktemp); trap 'rm -f $idx' EXIT; \
         GIT_INDEX_FILE=$idx git read-tree {base}; GIT_INDEX_FILE=$idx git add -A; \
         GIT_INDEX_FILE=$idx git diff --cached --binary {base}"
    )
}

/// Git refs and branch names accepted from users: no shell metacharacters.
pub fn validate_ref(r: &str) -> Result<(), WorkspaceError> {
    let ok = !r.is_empty()
        && r.len() <= 200
        && !r.starts_with('-')
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./~^@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(WorkspaceError::InvalidRef(r.into()))
    }
}

/// Frames every write as one bulk-port chunk (length prefix + bytes).
pub(crate) struct Chunked<W>(pub(crate) W);

impl<W: Write> Write for Chunked<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(BULK_CHUNK);
        if n == 0 {
            return Ok(0);
        }
        self.0.write_all(&(n as u32).to_be_bytes())?;
        self.0.write_all(&buf[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
