//! The shared libraries a dynamically linked program needs, for the places
//! banger runs a host program where the host's libraries are not: the
//! guest agent in an image with another libc, Firecracker in its jail.

use std::path::{Path, PathBuf};

/// One library a program loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedLib {
    /// Where it is on the host (the program looks for it at that path).
    pub path: PathBuf,
    /// The program interpreter (`ld-linux`), not a `NEEDED` library.
    pub interpreter: bool,
}

/// What `ldd` reports for `program`; empty for a static one.
pub fn of(program: &Path) -> std::io::Result<Vec<SharedLib>> {
    let out = std::process::Command::new("ldd").arg(program).output()?;
    if !out.status.success() {
        // "not a dynamic executable": nothing to bring along.
        return Ok(Vec::new());
    }
    Ok(parse(&String::from_utf8_lossy(&out.stdout)))
}

fn parse(ldd: &str) -> Vec<SharedLib> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let (path, interpreter) = match line.split_once(" => ") {
                Some((_, rest)) => (rest.split_whitespace().next()?, false),
                None => (line.split_whitespace().next()?, true),
            };
            // The vDSO has no file.
            path.starts_with('/').then(|| SharedLib {
                path: PathBuf::from(path),
                interpreter,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_read_as_libraries_and_the_interpreter() {
        let libs = parse(
            "\tlinux-vdso.so.1 (0x00007ffd)\n\
             \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
             \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n",
        );
        assert_eq!(
            libs,
            vec![
                SharedLib {
                    path: "/lib/x86_64-linux-gnu/libc.so.6".into(),
                    interpreter: false
                },
                SharedLib {
                    path: "/lib64/ld-linux-x86-64.so.2".into(),
                    interpreter: true
                },
            ]
        );
    }
}
