use banger_store::{ImageRecord, SessionRecord, Store, StoreError, VmRecord, VmRuntime, VmSpec, VmState};

fn image(name: &str) -> ImageRecord {
    ImageRecord {
        name: name.into(),
        rootfs: "/images/rootfs.ext4".into(),
        kernel: "/kernels/vmlinuz".into(),
        initrd: None,
        size_bytes: 1 << 30,
        source: "test".into(),
        created_at: banger_store::now(),
        digest: Some(format!("sha256:{}", "ab".repeat(32))),
    }
}

fn vm(name: &str) -> VmRecord {
    VmRecord {
        id: format!("id-{name}"),
        name: name.into(),
        spec: VmSpec {
            image: "default".into(),
            vcpus: 2,
            memory_mib: 512,
            work_disk_bytes: 1 << 30,
            vmm: "qemu".into(),
            nat: false,
            peers: false,
            network: false,
            auto_stop_idle_secs: None,
            netns: None,
        },
        runtime: VmRuntime::default(),
        created_at: banger_store::now(),
    }
}

#[test]
fn records_survive_reopen_and_names_are_unique() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    {
        let s = Store::open(&db).unwrap();
        s.insert_image(&image("default")).unwrap();
        s.insert_vm(&vm("alpha")).unwrap();
        let mut rt = VmRuntime {
            state: VmState::Running,
            tap: Some("bgtap0".into()),
            ..Default::default()
        };
        rt.guest_ip = Some("172.30.0.2".into());
        s.update_vm_runtime("id-alpha", &rt).unwrap();
        assert!(matches!(
            s.insert_vm(&vm("alpha")),
            Err(StoreError::AlreadyExists(_))
        ));
    }
    let s = Store::open(&db).unwrap();
    let got = s.get_vm("alpha").unwrap().expect("vm persisted");
    assert_eq!(got.runtime.state, VmState::Running);
    assert_eq!(got.runtime.tap.as_deref(), Some("bgtap0"));
    assert_eq!(s.get_vm("id-alpha").unwrap().unwrap().name, "alpha");
    assert_eq!(s.list_vms().unwrap().len(), 1);
    assert_eq!(s.schema_version().unwrap(), 4);
    let img = s.get_image("default").unwrap().expect("image persisted");
    assert_eq!(img.digest, image("default").digest, "the image digest was lost");
}

#[test]
fn foreign_keys_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("state.db")).unwrap();
    // No such image: the VM row is refused.
    assert!(s.insert_vm(&vm("orphan")).is_err());
    s.insert_image(&image("default")).unwrap();
    s.insert_vm(&vm("user")).unwrap();
    // An image in use cannot be deleted from under its VM.
    assert!(s.delete_image("default").is_err());
    assert!(s.delete_vm("id-user").unwrap());
    assert!(s.delete_image("default").unwrap());
}

#[test]
fn read_only_open_never_creates_or_migrates() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    assert!(
        Store::open_read_only(&db).is_err(),
        "read-only open must not create a database"
    );
    assert!(!db.exists());
    Store::open(&db).unwrap().insert_image(&image("default")).unwrap();
    let ro = Store::open_read_only(&db).unwrap();
    assert_eq!(ro.list_images().unwrap().len(), 1);
    assert!(
        ro.insert_image(&image("other")).is_err(),
        "read-only store accepted a write"
    );
}

#[test]
fn wal_and_full_sync_are_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let _s = Store::open(&db).unwrap();
    let c = rusqlite::Connection::open(&db).unwrap();
    let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn an_intent_write_is_committed_at_once_and_later_writes_sync_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let s = Store::open(&db).unwrap();
    assert_eq!(s.synchronous().unwrap(), 2, "FULL");
    s.insert_image(&image("default")).unwrap();
    let mut v = vm("a");
    s.insert_vm(&v).unwrap();
    v.runtime.state = VmState::Starting;
    s.update_vm_runtime_intent(&v.id, &v.runtime).unwrap();
    // Committed: another connection (another process) reads it already.
    let c = rusqlite::Connection::open(&db).unwrap();
    let state: String = c
        .query_row("SELECT state FROM vms WHERE id = ?1", [&v.id], |r| r.get(0))
        .unwrap();
    assert_eq!(state, "starting");
    assert_eq!(s.synchronous().unwrap(), 2, "the next write syncs again");
    drop(s);
    let s = Store::open(&db).unwrap();
    assert_eq!(s.get_vm("a").unwrap().unwrap().runtime.state, VmState::Starting);
}

#[test]
fn a_state_synced_soon_is_committed_at_once_and_on_disk_shortly_after() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let s = Store::open(&db).unwrap();
    s.insert_image(&image("default")).unwrap();
    let mut v = vm("a");
    s.insert_vm(&v).unwrap();
    v.runtime.state = VmState::Running;
    s.update_vm_runtime_sync_soon(&v.id, &v.runtime).unwrap();
    let c = rusqlite::Connection::open(&db).unwrap();
    let state: String = c
        .query_row("SELECT state FROM vms WHERE id = ?1", [&v.id], |r| r.get(0))
        .unwrap();
    assert_eq!(state, "running");
    assert!(s.wait_synced(std::time::Duration::from_secs(10)), "never synced");
    assert_eq!(s.synchronous().unwrap(), 2, "the next write syncs again");
}

#[test]
fn an_empty_database_file_is_refused_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    std::fs::write(&db, b"").unwrap();
    let err = Store::open(&db).err().expect("an empty file is refused");
    assert!(err.to_string().contains("is empty"), "{err}");
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0, "the file was touched");
    // A missing file is a first start.
    let fresh = dir.path().join("fresh.db");
    Store::open(&fresh).unwrap();
}

fn session(id: &str, vm_id: &str, name: &str) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        vm_id: vm_id.into(),
        name: name.into(),
        argv: vec!["sleep".into(), "10".into()],
        tty: false,
        state: "starting".into(),
        code: None,
        signal: None,
        boot_id: None,
        op_id: "op-0123456789".into(),
        created_at: banger_store::now(),
    }
}

#[test]
fn sessions_are_cataloged_per_vm_settled_and_go_with_their_vm() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("state.db")).unwrap();
    s.insert_image(&image("default")).unwrap();
    s.insert_vm(&vm("alpha")).unwrap();
    s.insert_session(&session("s1", "id-alpha", "web")).unwrap();
    assert!(matches!(
        s.insert_session(&session("s2", "id-alpha", "web")),
        Err(StoreError::AlreadyExists(_))
    ));
    // No session of a VM that does not exist.
    assert!(s.insert_session(&session("s3", "id-nope", "x")).is_err());
    s.settle_session("s1", "exited", Some(3), None, Some("boot-1"))
        .unwrap();
    s.settle_session("s1", "exited", Some(3), None, None).unwrap();
    let got = s.list_sessions("id-alpha").unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].state.as_str(), got[0].code, got[0].boot_id.as_deref()),
        ("exited", Some(3), Some("boot-1"))
    );
    assert_eq!(got[0].argv, ["sleep", "10"]);
    assert!(s.delete_vm("id-alpha").unwrap());
    assert!(s.list_sessions("id-alpha").unwrap().is_empty());
}

#[test]
fn snapshots_survive_reopen_are_unique_and_listed_least_recently_used_first() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("state.db");
    let snap = |id: &str, name: &str, used: &str| banger_store::SnapshotRecord {
        id: id.into(),
        name: name.into(),
        source_vm: "web".into(),
        vmm: "firecracker".into(),
        spec: vm("web").spec,
        base_rootfs: "/img/rootfs.ext4".into(),
        dir: format!("/snap/{id}"),
        size_bytes: 5 << 30,
        op_id: "op".into(),
        created_at: "2026-01-01T00:00:00Z".into(),
        last_used_at: used.into(),
    };
    {
        let s = Store::open(&path).unwrap();
        s.insert_snapshot(&snap("a1", "old", "2026-01-01T00:00:00Z"))
            .unwrap();
        s.insert_snapshot(&snap("b2", "new", "2026-01-02T00:00:00Z"))
            .unwrap();
        assert!(matches!(
            s.insert_snapshot(&snap("c3", "new", "2026-01-03T00:00:00Z")),
            Err(StoreError::AlreadyExists(_))
        ));
    }
    let s = Store::open(&path).unwrap();
    let names: Vec<String> = s.list_snapshots().unwrap().into_iter().map(|x| x.name).collect();
    assert_eq!(names, ["old", "new"]);
    s.touch_snapshot("a1", "2026-01-05T00:00:00Z").unwrap();
    let names: Vec<String> = s.list_snapshots().unwrap().into_iter().map(|x| x.name).collect();
    assert_eq!(names, ["new", "old"]);
    let got = s.get_snapshot("new").unwrap().unwrap();
    assert_eq!(got, snap("b2", "new", "2026-01-02T00:00:00Z"));
    assert!(s.delete_snapshot("b2").unwrap());
    assert!(s.get_snapshot("new").unwrap().is_none());
}
