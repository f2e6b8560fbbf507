//! VM names are DNS labels: they become `<name>.vm`.

/// 1-63 characters of `[a-z0-9-]`, not starting or ending with `-`.
pub fn validate(name: &str) -> Result<(), String> {
    banger_proto::names::validate_vm_name(name)
}

const ADJECTIVES: &[&str] = &[
    "brisk", "calm", "eager", "fuzzy", "keen", "lucky", "nimble", "quiet", "rapid", "sunny",
];
const NOUNS: &[&str] = &[
    "otter", "falcon", "badger", "heron", "lynx", "marten", "panda", "raven", "tapir", "yak",
];

/// A readable, probably unique name such as `keen-otter-3f2a`.
pub fn generate() -> String {
    let r = crate::kernel::rand_u32();
    format!(
        "{}-{}-{:04x}",
        ADJECTIVES[(r % 10) as usize],
        NOUNS[((r / 10) % 10) as usize],
        (r >> 16) & 0xffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for good in ["a", "dev-1", "x".repeat(63).as_str(), "0abc"] {
            assert!(validate(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "x".repeat(64).as_str(),
            "../etc",
            "a b",
        ] {
            assert!(validate(bad).is_err(), "{bad}");
        }
        for _ in 0..50 {
            assert!(validate(&generate()).is_ok());
        }
    }
}
