//! A patch exported from a guest is untrusted input: the guest runs code
//! an agent or a test suite chose. Before it reaches the host, say what in
//! it could hurt: symlinks (a later write through `README -> ~/.ssh/...`
//! lands outside the checkout), files made executable, and paths git would
//! refuse (absolute, `..`, `.git`).

/// What a patch does that deserves the user's eyes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Risks {
    /// Symlinks created or changed: `path -> target`.
    pub symlinks: Vec<String>,
    /// Files that become executable.
    pub executables: Vec<String>,
    /// Paths no patch from a workspace should touch.
    pub bad_paths: Vec<String>,
}

impl Risks {
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.symlinks.is_empty() && self.executables.is_empty() && self.bad_paths.is_empty()
    }
}

fn bad_path(p: &str) -> bool {
    p.starts_with('/')
        || p.split('/').any(|c| c == ".." || c == ".git" || c.is_empty())
        || p.chars().any(|c| c.is_control())
}

pub fn scan(patch: &[u8]) -> Risks {
    let text = String::from_utf8_lossy(patch);
    let mut r = Risks::default();
    let mut path: Option<String> = None;
    let mut symlink = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("diff --git ") {
            path = rest.split(" b/").last().map(str::to_owned);
            symlink = false;
            for p in rest
                .split_whitespace()
                .map(|p| p.trim_start_matches("a/").trim_start_matches("b/"))
            {
                if bad_path(p) && !r.bad_paths.contains(&p.to_string()) {
                    r.bad_paths.push(p.to_string());
                }
            }
            continue;
        }
        let Some(p) = &path else { continue };
        if line == "new file mode 120000" || line == "new mode 120000" {
            symlink = true;
        } else if line == "new file mode 100755" || line == "new mode 100755" {
            r.executables.push(p.clone());
        } else if symlink {
            // The link's target is its one line of content.
            if let Some(target) = line.strip_prefix('+').filter(|l| !l.starts_with("++")) {
                r.symlinks.push(format!("{p} -> {target}"));
                symlink = false;
            } else if line.starts_with("GIT binary patch") {
                r.symlinks.push(format!("{p} -> (binary)"));
                symlink = false;
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_executables_and_bad_paths_are_found() {
        let patch = "diff --git a/README b/README\nnew file mode 120000\nindex 0000000..1111111\n--- /dev/null\n+++ b/README\n@@ -0,0 +1 @@\n+/etc/passwd\n\\ No newline at end of file\n\
diff --git a/run.sh b/run.sh\nold mode 100644\nnew mode 100755\n\
diff --git a/x/../../y b/x/../../y\nnew file mode 100644\n\
diff --git a/src/lib.txt b/src/lib.txt\nindex 1..2 100644\n--- a/src/lib.txt\n+++ b/src/lib.txt\n@@ -1 +1,2 @@\n line\n+more\n";
        let r = scan(patch.as_bytes());
        assert_eq!(r.symlinks, ["README -> /etc/passwd"]);
        assert_eq!(r.executables, ["run.sh"]);
        assert_eq!(r.bad_paths, ["x/../../y"]);
    }

    #[test]
    fn an_ordinary_patch_is_clean() {
        let patch =
            "diff --git a/a.txt b/a.txt\nindex 1..2 100644\n--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-x\n+y\n";
        assert!(scan(patch.as_bytes()).is_empty());
    }
}
