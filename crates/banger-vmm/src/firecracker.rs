//! Firecracker: the production back-end on hosts with a usable KVM.
//! Placeholder until its API driver lands; selecting it is refused with a
//! clear error rather than half-working.

use crate::{LaunchSpec, Launched, Vmm, VmmError, VmmKind};
use std::path::PathBuf;

pub struct Firecracker {
    pub binary: PathBuf,
}

impl Vmm for Firecracker {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    async fn launch(&self, _spec: &LaunchSpec) -> Result<Launched, VmmError> {
        Err(VmmError::Failed(format!(
            "the Firecracker back-end ({}) is not available in this build; use vmm = \"qemu\"",
            self.binary.display()
        )))
    }
}
