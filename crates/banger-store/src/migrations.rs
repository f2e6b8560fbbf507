//! Forward-only schema migrations, recorded in `schema_migrations`.
//! Never edit a shipped migration: append a new one.

use crate::{Result, StoreError};
use rusqlite::Connection;

const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE images (
        name        TEXT PRIMARY KEY,
        rootfs      TEXT NOT NULL,
        kernel      TEXT NOT NULL,
        initrd      TEXT,
        size_bytes  INTEGER NOT NULL,
        source      TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE TABLE vms (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        image       TEXT NOT NULL REFERENCES images(name) ON DELETE RESTRICT,
        state       TEXT NOT NULL,
        spec        TEXT NOT NULL,
        runtime     TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL
    );",
    ),
    // Where an image came from is `source`; this is what identifies its
    // content: an imported image's manifest digest, a built one's file hash.
    (2, "ALTER TABLE images ADD COLUMN digest TEXT;"),
    // Guest sessions: the daemon's catalog of what each VM's agent runs.
    // A row is written (`starting`) before the agent is asked, and settled
    // from the agent's answers; a VM's rows go with it.
    (
        3,
        "CREATE TABLE guest_sessions (
            id          TEXT PRIMARY KEY,
            vm_id       TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
            name        TEXT NOT NULL,
            argv        TEXT NOT NULL,
            tty         INTEGER NOT NULL,
            state       TEXT NOT NULL,
            code        INTEGER,
            signal      INTEGER,
            boot_id     TEXT,
            op_id       TEXT NOT NULL,
            created_at  TEXT NOT NULL,
            UNIQUE (vm_id, name)
        );",
    ),
    // Snapshots: a VM's memory, device state and disks, saved to restore
    // new VMs from. The files live in `dir`; a row is written only once
    // they are complete.
    (
        4,
        "CREATE TABLE snapshots (
            id           TEXT PRIMARY KEY,
            name         TEXT NOT NULL UNIQUE,
            source_vm    TEXT NOT NULL,
            vmm          TEXT NOT NULL,
            spec         TEXT NOT NULL,
            base_rootfs  TEXT NOT NULL,
            dir          TEXT NOT NULL,
            size_bytes   INTEGER NOT NULL,
            op_id        TEXT NOT NULL,
            created_at   TEXT NOT NULL,
            last_used_at TEXT NOT NULL
        );",
    ),
];

/// The schema version this build writes and reads.
pub fn latest() -> i64 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

pub fn current_version(conn: &Connection) -> Result<i64> {
    let exists: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(0);
    }
    Ok(conn.query_row(
        "SELECT coalesce(max(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?)
}

pub fn apply(conn: &mut Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
    )?;
    let have = current_version(conn)?;
    let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if have > known {
        return Err(StoreError::TooNew { found: have, known });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > have) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            rusqlite::params![version, crate::now()],
        )?;
        tx.commit()?;
    }
    Ok(())
}
