//! A stand-in for the kernel's link table (`NetOps`) for the service's
//! unit tests, which check validation and sequencing only.

use super::*;
use crate::firewall::Claim;
use crate::net::Link;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

/// In-memory stand-in for the kernel's link table, for unit tests of
/// validation and sequencing only. The real effects are tested against
/// `LinuxNet` in a network namespace by the end-to-end suite.
#[derive(Default)]
pub(super) struct FakeNetForTests {
    links: Mutex<HashMap<String, Link>>,
    addrs: Mutex<HashMap<u32, Vec<(Ipv4Addr, u8)>>>,
    guests: Mutex<HashMap<String, Guest>>,
    calls: Mutex<Vec<String>>,
}

impl FakeNetForTests {
    pub(super) fn add(&self, name: &str, kind: LinkKind) {
        let mut l = self.links.lock().unwrap();
        let index = l.len() as u32 + 10;
        l.insert(
            name.into(),
            Link {
                index,
                kind,
                up: false,
                controller: None,
            },
        );
    }
    pub(super) fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl NetOps for FakeNetForTests {
    async fn link(&self, name: &str) -> Result<Option<Link>, NetError> {
        Ok(self.links.lock().unwrap().get(name).cloned())
    }
    async fn create_bridge(&self, name: &str) -> Result<(), NetError> {
        self.calls.lock().unwrap().push(format!("create_bridge {name}"));
        self.add(name, LinkKind::Bridge);
        Ok(())
    }
    async fn create_tap(&self, name: &str, _: Option<u32>) -> Result<(), NetError> {
        self.calls.lock().unwrap().push(format!("create_tap {name}"));
        self.add(name, LinkKind::Tap);
        Ok(())
    }
    async fn set_up(&self, index: u32, controller: Option<u32>) -> Result<(), NetError> {
        self.calls.lock().unwrap().push(format!("set_up {index}"));
        for l in self
            .links
            .lock()
            .unwrap()
            .values_mut()
            .filter(|l| l.index == index)
        {
            l.up = true;
            l.controller = controller;
        }
        Ok(())
    }
    async fn add_address(&self, index: u32, ip: Ipv4Addr, len: u8) -> Result<(), NetError> {
        self.addrs
            .lock()
            .unwrap()
            .entry(index)
            .or_default()
            .push((ip, len));
        self.calls.lock().unwrap().push(format!("add_address {ip}/{len}"));
        Ok(())
    }
    async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
        Ok(self
            .addrs
            .lock()
            .unwrap()
            .get(&index)
            .cloned()
            .unwrap_or_default())
    }
    async fn open_tap(&self, _: &str) -> Result<std::os::fd::OwnedFd, NetError> {
        Ok(std::fs::File::open("/dev/null").unwrap().into())
    }
    async fn guest_allow(&self, g: &Guest) -> Result<bool, NetError> {
        self.calls.lock().unwrap().push(format!("guest_allow {}", g.vm));
        let old = self.guests.lock().unwrap().insert(g.vm.clone(), g.clone());
        Ok(old.as_ref() != Some(g))
    }
    async fn guest_revoke(&self, vm: &str) -> Result<bool, NetError> {
        self.calls.lock().unwrap().push(format!("guest_revoke {vm}"));
        Ok(self.guests.lock().unwrap().remove(vm).is_some())
    }
    async fn guest_claims(&self) -> Result<Vec<Claim>, NetError> {
        let mut v: Vec<Claim> = self
            .guests
            .lock()
            .unwrap()
            .values()
            .filter_map(|g| crate::firewall::claim_of(&g.comment()))
            .collect();
        v.sort_by(|a, b| a.vm.cmp(&b.vm));
        Ok(v)
    }
    async fn delete_link(&self, index: u32) -> Result<(), NetError> {
        self.calls.lock().unwrap().push(format!("delete {index}"));
        self.links.lock().unwrap().retain(|_, l| l.index != index);
        Ok(())
    }
    async fn ensure_jail_net(&self, j: &JailLink) -> Result<bool, NetError> {
        self.calls.lock().unwrap().push(format!(
            "ensure_jail_net {} {} {} uid={}",
            j.netns.display(),
            j.tap,
            j.peer,
            j.owner_uid
        ));
        if self.links.lock().unwrap().contains_key(&j.tap) {
            return Ok(false);
        }
        self.add(&j.tap, LinkKind::Veth);
        if let Some(l) = self.links.lock().unwrap().get_mut(&j.tap) {
            (l.up, l.controller) = (true, Some(j.bridge));
        }
        Ok(true)
    }
    async fn delete_jail_net(
        &self,
        netns: &std::path::Path,
        tap: &str,
        peer: &str,
    ) -> Result<bool, NetError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("delete_jail_net {} {tap} {peer}", netns.display()));
        let mut l = self.links.lock().unwrap();
        let had = l.get(tap).is_some_and(|l| l.kind == LinkKind::Veth);
        if had {
            l.remove(tap);
        }
        Ok(had)
    }
    async fn ensure_pod_net(
        &self,
        netns: &std::path::Path,
        tap: &str,
        owner_uid: u32,
    ) -> Result<(crate::podnet::PodAddress, std::os::fd::OwnedFd, bool), NetError> {
        self.calls.lock().unwrap().push(format!(
            "ensure_pod_net {} {tap} uid={owner_uid}",
            netns.display()
        ));
        Err(NetError::NoLink(format!(
            "{tap} (no engine namespaces in the fake)"
        )))
    }
    async fn delete_pod_net(&self, netns: &std::path::Path, tap: &str) -> Result<bool, NetError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("delete_pod_net {} {tap}", netns.display()));
        Ok(false)
    }
}
