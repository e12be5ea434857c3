//! Making a sled flush mean "on stable storage".
//!
//! sled 0.34's `flush` writes its log with `pwrite` and then, on Linux, `sync_file_range`
//! (sled-0.34.7 src/pagecache/iobuf.rs), which waits for the data pages to be written but
//! neither persists the file's metadata (a grown file's size) nor flushes the disk's write
//! cache; only sled's background flusher calls `fsync`, every 500 ms. A commit acknowledged
//! after `flush` alone could therefore be lost on power failure. [`SyncedFlush`] adds one
//! `fdatasync` of sled's log file after each flush: the stores that promise durability (the
//! mail host's outbox, the agent's inbox) flush through it.

use std::fs::File;
use std::path::Path;

/// A sled database plus a handle on its log file, to `fdatasync` after every flush.
#[derive(Debug)]
pub struct SyncedFlush {
    file: File,
}

impl SyncedFlush {
    /// `dir` is the directory the database was opened at (sled keeps its log in `dir/db`).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        Ok(Self {
            file: File::open(dir.join("db"))?,
        })
    }

    /// `db.flush()`, then `fdatasync` of the log file. Returns the bytes sled flushed.
    pub fn flush(&self, db: &sled::Db) -> sled::Result<usize> {
        let n = db.flush()?;
        self.file.sync_data().map_err(sled::Error::Io)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn flushes_a_real_store() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let s = SyncedFlush::open(dir.path()).unwrap();
        db.insert(b"k", b"v").unwrap();
        s.flush(&db).unwrap();
        drop(db);
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert!(SyncedFlush::open(&dir.path().join("missing")).is_err());
    }
}
