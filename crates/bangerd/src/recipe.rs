//! Image recipes: what `debootstrap` installs, on which Debian suite, and
//! how large the image is. Pure, so the rules are tested without a build.
//!
//! A recipe's `source` string is recorded with the image; the default image
//! is rebuilt when the recipe of this build differs from the recorded one.

/// What banger itself needs in every image: workspaces (git), `vm ssh`
/// (openssh-server), networking (iproute2) and TLS roots.
const BASE: [&str; 4] = ["ca-certificates", "git", "iproute2", "openssh-server"];

/// The default image is a dev box: what a project's `make test` usually
/// assumes is there.
const DEV_BOX: [&str; 16] = [
    "build-essential",
    "curl",
    "iputils-ping",
    "jq",
    "less",
    "make",
    "procps",
    "python3",
    "python3-pip",
    "python3-venv",
    "sudo",
    "unzip",
    "xz-utils",
    "file",
    "patch",
    "wget",
];

/// Debian suites an image can be built from.
pub const SUITES: [&str; 2] = ["bookworm", "trixie"];

/// Largest image size accepted (MiB).
pub const MAX_SIZE_MIB: u64 = 256 * 1024;

/// Bump when the way a recipe is turned into an image changes in a way the
/// package list does not show (the default image is then rebuilt).
const REVISION: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    pub suite: String,
    /// Sorted, without duplicates, always including [`BASE`].
    pub packages: Vec<String>,
    /// A fixed image size; else sized to its content.
    pub size_mib: Option<u64>,
}

impl Recipe {
    /// The recipe of the default image.
    pub fn default_image() -> Recipe {
        Recipe::new("bookworm", DEV_BOX.iter().map(|p| p.to_string()), None)
    }

    fn new(suite: &str, extra: impl Iterator<Item = String>, size_mib: Option<u64>) -> Recipe {
        let mut packages: Vec<String> = BASE.iter().map(|p| p.to_string()).chain(extra).collect();
        packages.sort();
        packages.dedup();
        Recipe {
            suite: suite.to_string(),
            packages,
            size_mib,
        }
    }

    /// A user's recipe (`image build --packages --suite --size`), checked
    /// before anything runs: package names are passed to debootstrap as
    /// one argument, so only Debian's package-name characters get through.
    pub fn custom(suite: Option<&str>, packages: &[String], size_mib: Option<u64>) -> Result<Recipe, String> {
        let suite = suite.unwrap_or("bookworm");
        if !SUITES.contains(&suite) {
            return Err(format!(
                "suite must be one of {}, not {suite:?}",
                SUITES.join(", ")
            ));
        }
        for p in packages {
            if !valid_package(p) {
                return Err(format!("{p:?} is not a Debian package name"));
            }
        }
        if let Some(mib) = size_mib {
            if !(256..=MAX_SIZE_MIB).contains(&mib) {
                return Err(format!("image size must be 256-{MAX_SIZE_MIB} MiB, not {mib}"));
            }
        }
        Ok(Recipe::new(suite, packages.iter().cloned(), size_mib))
    }

    /// What is recorded as the image's source, and compared to decide
    /// whether a default image is current.
    pub fn source(&self) -> String {
        let size = self.size_mib.map(|m| format!(" size {m}M")).unwrap_or_default();
        format!(
            "debootstrap --variant=minbase {} +{}{size} (recipe r{REVISION})",
            self.suite,
            self.packages.join(",")
        )
    }

    /// The `--include=` argument for debootstrap.
    pub fn include_arg(&self) -> String {
        format!("--include={}", self.packages.join(","))
    }
}

/// Debian policy: lowercase letters, digits, `+ - .`; at least two
/// characters, starting with a letter or digit.
fn valid_package(p: &str) -> bool {
    p.len() >= 2
        && p.len() <= 100
        && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_image_is_a_dev_box_with_what_banger_needs() {
        let r = Recipe::default_image();
        for p in [
            "build-essential",
            "python3-venv",
            "curl",
            "jq",
            "iputils-ping",
            "sudo",
            "git",
            "openssh-server",
        ] {
            assert!(r.packages.iter().any(|x| x == p), "{p} missing");
        }
        let mut sorted = r.packages.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, r.packages);
        assert!(r.source().starts_with("debootstrap --variant=minbase bookworm +"));
    }

    #[test]
    fn a_custom_recipe_keeps_the_base_and_is_canonical() {
        let a = Recipe::custom(None, &["jq".into(), "curl".into(), "jq".into()], None).unwrap();
        let b = Recipe::custom(Some("bookworm"), &["curl".into(), "jq".into()], None).unwrap();
        assert_eq!(a.source(), b.source(), "same recipe, same source");
        assert!(a.packages.iter().any(|p| p == "openssh-server"));
        assert_ne!(a.source(), Recipe::default_image().source());
        assert!(Recipe::custom(Some("trixie"), &[], Some(4096))
            .unwrap()
            .source()
            .contains("trixie"));
    }

    #[test]
    fn hostile_or_odd_recipes_are_refused() {
        for bad in ["", "a", "Foo", "curl,jq", "x;reboot", "--root=/", "a b", "é"] {
            assert!(
                Recipe::custom(None, &[bad.into()], None).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(Recipe::custom(Some("sid"), &[], None).is_err());
        assert!(Recipe::custom(Some("../x"), &[], None).is_err());
        assert!(Recipe::custom(None, &[], Some(100)).is_err());
        assert!(Recipe::custom(None, &[], Some(MAX_SIZE_MIB + 1)).is_err());
        assert!(Recipe::custom(
            None,
            &["g++".into(), "libc6-dev".into(), "python3.11".into()],
            None
        )
        .is_ok());
    }
}
