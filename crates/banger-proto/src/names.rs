//! Naming rules every side enforces: the CLI to fail fast, the daemon
//! because it trusts no client; and the one name both the helper and its
//! clients must agree on without configuration.

/// Where the root helper listens unless told otherwise: the helper's own
/// default and the daemon's are this one constant, so a helper started
/// with no flags is the one a daemon with no configuration finds.
pub const DEFAULT_HELPER_SOCKET: &str = "/run/banger-helper/helper.sock";

/// VM names are DNS labels, since they become `<name>.vm`: 1-63
/// characters of `[a-z0-9-]`, not starting or ending with `-`.
pub fn validate_vm_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid VM name {name:?}: use 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
        ))
    }
}
