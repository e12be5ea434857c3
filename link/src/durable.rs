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
use std::time::{Duration, Instant};

/// Why [`open_waiting`] failed.
#[derive(Debug)]
pub enum OpenWaiting {
    /// Another handle or process still held the store's lock when the wait ran out.
    Locked,
    /// Any other error of sled's.
    Sled(sled::Error),
}

/// Opens a sled database, waiting up to `wait` while another handle or process holds its
/// lock (a restarting daemon's predecessor, or sled's own I/O threads finishing after a
/// close). Blocking.
pub fn open_waiting(config: &sled::Config, wait: Duration) -> Result<sled::Db, OpenWaiting> {
    let give_up = Instant::now() + wait;
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            // sled reports a held lock as an I/O error of kind Other with this text.
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if Instant::now() >= give_up {
                    return Err(OpenWaiting::Locked);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(OpenWaiting::Sled(e)),
        }
    }
}

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

    #[test]
    fn open_waiting_waits_for_the_lock_then_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = sled::Config::new().path(dir.path());
        let held = open_waiting(&config, Duration::ZERO).unwrap();
        let t = Instant::now();
        assert!(matches!(
            open_waiting(&config, Duration::from_millis(100)),
            Err(OpenWaiting::Locked)
        ));
        assert!(t.elapsed() >= Duration::from_millis(100));
        // Let go while a second open waits: it gets the store.
        let waiter = std::thread::spawn(move || open_waiting(&config, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(50));
        drop(held);
        assert!(waiter.join().unwrap().is_ok());
        // Other errors are sled's own.
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            open_waiting(&sled::Config::new().path(&file), Duration::ZERO),
            Err(OpenWaiting::Sled(_))
        ));
    }
}
