//! Durable state: what a VM *is* and which images exist.
//!
//! Nothing here describes what is true right now (PIDs, taps, loop devices);
//! that lives in the daemon's memory and per-VM scratch files, rebuilt from
//! the OS at start-up. See ARCHITECTURE.md.

mod migrations;
mod records;
mod syncer;

pub use records::{ImageRecord, SessionRecord, SnapshotRecord, VmRecord, VmRuntime, VmSpec, VmState};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt record {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("database schema version {found} is newer than this build understands ({known})")]
    TooNew { found: i64, known: i64 },
    /// A database file that exists but is empty: never silently replaced
    /// by a fresh database (that would forget every VM and image).
    #[error(
        "{path} is empty (0 bytes) although it should hold banger's state; refusing to start \
         with a blank one. Restore it from a backup, or move it away to start from scratch"
    )]
    Empty { path: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The schema version this build writes and reads.
pub fn schema_latest() -> i64 {
    migrations::latest()
}

/// The store. One connection behind a mutex: SQLite serialises writers
/// anyway, and every statement here is short.
pub struct Store {
    conn: Mutex<Connection>,
    /// Syncs the WAL for [`Store::update_vm_runtime_sync_soon`]; none for a
    /// read-only store.
    syncer: Option<syncer::Syncer>,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        // SQLite treats an empty file as a new database. Only a missing file
        // is a first start.
        if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
            return Err(StoreError::Empty {
                path: path.display().to_string(),
            });
        }
        let conn = Connection::open(path)?;
        // WAL + synchronous=FULL: an acknowledged commit survives power loss.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut conn = conn;
        migrations::apply(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
            syncer: Some(syncer::Syncer::start(&wal_path(path))),
        })
    }

    /// Opens read-only for diagnostics: never creates, never migrates.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        Ok(Store {
            conn: Mutex::new(conn),
            syncer: None,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (statements are atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection's `PRAGMA synchronous` (2: FULL), for diagnostics
    /// and for the check that an intent write leaves it as it was.
    pub fn synchronous(&self) -> Result<i64> {
        Ok(self.conn().query_row("PRAGMA synchronous", [], |r| r.get(0))?)
    }

    pub fn schema_version(&self) -> Result<i64> {
        migrations::current_version(&self.conn())
    }

    // ---- VMs ----

    pub fn insert_vm(&self, vm: &VmRecord) -> Result<()> {
        Self::insert_vm_on(&self.conn(), vm)
    }

    /// [`Store::insert_vm`] for a VM being made, whose creation ends with a
    /// synced write: see [`Store::update_vm_runtime_intent`]. A power loss
    /// before that end forgets the VM; its directory is then one without a
    /// record, which the daemon sweeps at start-up.
    pub fn insert_vm_intent(&self, vm: &VmRecord) -> Result<()> {
        Self::relaxed(&self.conn(), |c| Self::insert_vm_on(c, vm))
    }

    /// Runs `f` with `synchronous=NORMAL`: committed to the WAL (a killed
    /// process loses nothing), not synced; the connection syncs again
    /// afterwards, whatever `f` did.
    fn relaxed<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let res = f(conn);
        let full = conn.pragma_update(None, "synchronous", "FULL");
        let v = res?;
        full?;
        Ok(v)
    }

    fn insert_vm_on(conn: &Connection, vm: &VmRecord) -> Result<()> {
        let res = conn.execute(
            "INSERT INTO vms (id, name, image, state, spec, runtime, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
            params![
                vm.id,
                vm.name,
                vm.spec.image,
                vm.runtime.state.as_str(),
                to_json(&vm.spec),
                to_json(&vm.runtime),
                vm.created_at
            ],
        );
        match res {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::AlreadyExists(format!("vm {:?}", vm.name)))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    /// Gives a VM a new name (a warm-pool VM claimed under the name its
    /// taker asked for), and its runtime in the same statement.
    pub fn rename_vm(&self, id: &str, name: &str, runtime: &VmRuntime) -> Result<()> {
        let res = self.conn().execute(
            "UPDATE vms SET name = ?2, state = ?3, runtime = ?4, updated_at = ?5 WHERE id = ?1",
            params![id, name, runtime.state.as_str(), to_json(runtime), now()],
        );
        match res {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::AlreadyExists(format!("vm {name:?}")))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    /// Replaces what a VM *is* (`vm set` on a stopped VM).
    pub fn update_vm_spec(&self, id: &str, spec: &VmSpec) -> Result<()> {
        self.conn().execute(
            "UPDATE vms SET spec = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, to_json(spec), now()],
        )?;
        Ok(())
    }

    pub fn update_vm_runtime(&self, id: &str, runtime: &VmRuntime) -> Result<()> {
        self.conn().execute(
            "UPDATE vms SET state = ?2, runtime = ?3, updated_at = ?4 WHERE id = ?1",
            params![id, runtime.state.as_str(), to_json(runtime), now()],
        )?;
        Ok(())
    }

    /// [`Store::update_vm_runtime`] for an intent that a later write
    /// settles (the `starting` before a VMM is launched): committed to the
    /// WAL, which outlives a killed daemon, but not synced to disk, which
    /// only a power loss would need, and the settling write syncs it with
    /// everything before it. A power loss leaves the state before the
    /// intent, right for a machine on which nothing runs any more.
    pub fn update_vm_runtime_intent(&self, id: &str, runtime: &VmRuntime) -> Result<()> {
        Self::relaxed(&self.conn(), |c| {
            c.execute(
                "UPDATE vms SET state = ?2, runtime = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, runtime.state.as_str(), to_json(runtime), now()],
            )?;
            Ok(())
        })
    }

    /// [`Store::update_vm_runtime`] for a state that ends an operation
    /// (a started VM's `running`) and is answered at once: committed as an
    /// intent is, then synced to disk by the store's syncer thread moments
    /// later, off the caller's path, together with every commit before it.
    /// A power loss in that moment leaves the state before it, right for a
    /// machine on which nothing runs any more.
    pub fn update_vm_runtime_sync_soon(&self, id: &str, runtime: &VmRuntime) -> Result<()> {
        self.update_vm_runtime_intent(id, runtime)?;
        if let Some(s) = &self.syncer {
            s.ask();
        }
        Ok(())
    }

    /// Waits until every commit asked to be synced soon is on disk, for at
    /// most `limit`. False if that did not happen in time, or the last
    /// sync failed (the next synced commit syncs the WAL again).
    pub fn wait_synced(&self, limit: std::time::Duration) -> bool {
        self.syncer.as_ref().is_none_or(|s| s.wait(limit))
    }

    pub fn get_vm(&self, name_or_id: &str) -> Result<Option<VmRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, name, spec, runtime, created_at FROM vms WHERE name = ?1 OR id = ?1 LIMIT 1",
        )?;
        let row = stmt.query_row([name_or_id], raw_vm).optional()?;
        row.map(decode_vm).transpose()
    }

    pub fn list_vms(&self) -> Result<Vec<VmRecord>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT id, name, spec, runtime, created_at FROM vms ORDER BY created_at, name")?;
        let rows = stmt
            .query_map([], raw_vm)?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        rows.into_iter().map(decode_vm).collect()
    }

    pub fn delete_vm(&self, id: &str) -> Result<bool> {
        Ok(self.conn().execute("DELETE FROM vms WHERE id = ?1", [id])? > 0)
    }

    // ---- images ----

    pub fn insert_image(&self, img: &ImageRecord) -> Result<()> {
        let conn = self.conn();
        let res = conn.execute(
            "INSERT INTO images (name, rootfs, kernel, initrd, size_bytes, source, created_at, digest)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                img.name,
                img.rootfs,
                img.kernel,
                img.initrd,
                img.size_bytes as i64,
                img.source,
                img.created_at,
                img.digest
            ],
        );
        match res {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::AlreadyExists(format!("image {:?}", img.name)))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    pub fn get_image(&self, name: &str) -> Result<Option<ImageRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, rootfs, kernel, initrd, size_bytes, source, created_at, digest FROM images WHERE name = ?1",
        )?;
        Ok(stmt.query_row([name], image_row).optional()?)
    }

    pub fn list_images(&self) -> Result<Vec<ImageRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, rootfs, kernel, initrd, size_bytes, source, created_at, digest FROM images ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], image_row)?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Deletes an image row. Refused by a foreign key while a VM uses it.
    pub fn delete_image(&self, name: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM images WHERE name = ?1", [name])?
            > 0)
    }
}

impl Store {
    // ---- guest sessions ----

    pub fn insert_session(&self, r: &SessionRecord) -> Result<()> {
        let res = self.conn().execute(
            "INSERT INTO guest_sessions (id, vm_id, name, argv, tty, state, code, signal, boot_id, op_id, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                r.id,
                r.vm_id,
                r.name,
                to_json(&r.argv),
                r.tty,
                r.state,
                r.code,
                r.signal,
                r.boot_id,
                r.op_id,
                r.created_at
            ],
        );
        match res {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::AlreadyExists(format!("session {:?}", r.name)))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    /// Records what is now known of a session's state.
    pub fn settle_session(
        &self,
        id: &str,
        state: &str,
        code: Option<i32>,
        signal: Option<i32>,
        boot_id: Option<&str>,
    ) -> Result<()> {
        self.conn().execute(
            "UPDATE guest_sessions SET state = ?2, code = ?3, signal = ?4, boot_id = coalesce(?5, boot_id) WHERE id = ?1",
            params![id, state, code, signal, boot_id],
        )?;
        Ok(())
    }

    pub fn list_sessions(&self, vm_id: &str) -> Result<Vec<SessionRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, vm_id, name, argv, tty, state, code, signal, boot_id, op_id, created_at
             FROM guest_sessions WHERE vm_id = ?1 ORDER BY created_at, name",
        )?;
        let rows = stmt
            .query_map([vm_id], session_row)?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        rows.into_iter().collect()
    }

    pub fn delete_session(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM guest_sessions WHERE id = ?1", [id])?
            > 0)
    }
}

impl Store {
    // ---- snapshots ----

    pub fn insert_snapshot(&self, r: &SnapshotRecord) -> Result<()> {
        let res = self.conn().execute(
            "INSERT INTO snapshots (id, name, source_vm, vmm, spec, base_rootfs, dir, size_bytes, op_id, created_at, last_used_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                r.id,
                r.name,
                r.source_vm,
                r.vmm,
                to_json(&r.spec),
                r.base_rootfs,
                r.dir,
                r.size_bytes as i64,
                r.op_id,
                r.created_at,
                r.last_used_at
            ],
        );
        match res {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::AlreadyExists(format!("snapshot {:?}", r.name)))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    /// Oldest use first.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, name, source_vm, vmm, spec, base_rootfs, dir, size_bytes, op_id, created_at, last_used_at
             FROM snapshots ORDER BY last_used_at, created_at, name",
        )?;
        let rows = stmt
            .query_map([], snapshot_row)?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        rows.into_iter().collect()
    }

    pub fn get_snapshot(&self, name: &str) -> Result<Option<SnapshotRecord>> {
        Ok(self
            .list_snapshots()?
            .into_iter()
            .find(|s| s.name == name || s.id == name))
    }

    pub fn touch_snapshot(&self, id: &str, at: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE snapshots SET last_used_at = ?2 WHERE id = ?1",
            params![id, at],
        )?;
        Ok(())
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<bool> {
        Ok(self.conn().execute("DELETE FROM snapshots WHERE id = ?1", [id])? > 0)
    }
}

fn snapshot_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<SnapshotRecord>> {
    let spec: String = r.get(4)?;
    let name: String = r.get(1)?;
    let size: i64 = r.get(7)?;
    Ok(match serde_json::from_str(&spec) {
        Ok(spec) => Ok(SnapshotRecord {
            id: r.get(0)?,
            name,
            source_vm: r.get(2)?,
            vmm: r.get(3)?,
            spec,
            base_rootfs: r.get(5)?,
            dir: r.get(6)?,
            size_bytes: size.max(0) as u64,
            op_id: r.get(8)?,
            created_at: r.get(9)?,
            last_used_at: r.get(10)?,
        }),
        Err(e) => Err(StoreError::Corrupt {
            what: format!("snapshot {name:?}"),
            detail: e.to_string(),
        }),
    })
}

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<SessionRecord>> {
    let argv: String = r.get(3)?;
    let name: String = r.get(2)?;
    Ok(match serde_json::from_str(&argv) {
        Ok(argv) => Ok(SessionRecord {
            id: r.get(0)?,
            vm_id: r.get(1)?,
            name,
            argv,
            tty: r.get(4)?,
            state: r.get(5)?,
            code: r.get(6)?,
            signal: r.get(7)?,
            boot_id: r.get(8)?,
            op_id: r.get(9)?,
            created_at: r.get(10)?,
        }),
        Err(e) => Err(StoreError::Corrupt {
            what: format!("session {name:?} argv"),
            detail: e.to_string(),
        }),
    })
}

type RawVm = (String, String, String, String, String);

fn raw_vm(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawVm> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn decode_vm((id, name, spec, runtime, created_at): RawVm) -> Result<VmRecord> {
    let corrupt = |what: &str, e: serde_json::Error| StoreError::Corrupt {
        what: format!("vm {name:?} {what}"),
        detail: e.to_string(),
    };
    Ok(VmRecord {
        spec: serde_json::from_str(&spec).map_err(|e| corrupt("spec", e))?,
        runtime: serde_json::from_str(&runtime).map_err(|e| corrupt("runtime", e))?,
        id,
        name,
        created_at,
    })
}

fn image_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        name: r.get(0)?,
        rootfs: r.get(1)?,
        kernel: r.get(2)?,
        initrd: r.get(3)?,
        size_bytes: r.get::<_, i64>(4)? as u64,
        source: r.get(5)?,
        created_at: r.get(6)?,
        digest: r.get(7)?,
    })
}

/// SQLite's write-ahead log beside the database at `db`.
fn wal_path(db: &Path) -> std::path::PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push("-wal");
    db.with_file_name(name)
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("store records always serialise")
}

/// Seconds since the epoch, as text: sortable and timezone-free.
pub fn now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}
