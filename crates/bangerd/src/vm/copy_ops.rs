//! `vm cp` on a running VM: which way, and through whose bulk port. What
//! goes over the wire, and what is accepted back, is `crate::copy`'s.

use super::VmService;
use crate::copy;
use banger_proto::methods::daemon::{Copied, VmCopy};
use banger_proto::{OpId, RpcError};
use std::path::Path;

impl VmService {
    pub async fn copy(
        &self,
        op: &OpId,
        p: VmCopy,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<Copied, RpcError> {
        copy::guest_path(&p.guest)?;
        let host = Path::new(&p.host);
        if !host.is_absolute() {
            return Err(crate::error::CopyError::HostPath(host.to_path_buf()).into());
        }
        let vm = self.get(&p.name)?;
        let h = self.running_handles(&vm)?;
        let _busy = self.busy(&vm.id);
        let uds = &h.launched.vsock_uds;
        let moved = if p.to_guest {
            copy::push(uds, op, host, &p.guest, progress).await?
        } else {
            copy::pull(uds, op, &p.guest, host, progress).await?
        };
        tracing::info!(vm = %vm.name, to_guest = p.to_guest, bytes = moved.bytes, entries = moved.entries, "copied");
        Ok(Copied {
            bytes: moved.bytes,
            entries: moved.entries,
        })
    }
}
