//! The disk as a store sees it right now.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// `n` times: 4 KiB appended to a scratch file in `dir`, then `fsync`; the time of each pair.
/// `None` if the file cannot be created or written.
pub fn fsync_samples(dir: &Path, n: usize) -> Option<Vec<Duration>> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).ok()?;
    let block = [0x5au8; 4096];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        if f.write_all(&block).and_then(|()| f.sync_all()).is_err() {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        out.push(t.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    Some(out)
}
