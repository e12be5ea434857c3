//! Keeping the agent's resident memory level under a steady load (glibc's allocator).
//!
//! The agent's live heap is small and bounded (sled's cache, the dedupe ids at 16 bytes each),
//! but with glibc's default settings its RSS kept climbing in a soak: memory freed by sled's
//! copy-on-write nodes and by the dedupe archive stayed with the allocator. Measured causes
//! (docs/benchmarks.md, "Soak"):
//! - one malloc arena per thread that ever allocated, up to 8 per core, each holding its own
//!   freed memory;
//! - glibc's *dynamic* mmap threshold: once a large block served by `mmap` is freed, the
//!   threshold rises to its size (up to 32 MB), so later buffers of that size (sled's I/O
//!   buffers, the dedupe list as it grows) come from the heap and leave holes there;
//! - free memory inside the heap is returned only from its top, unless trimmed.
//!
//! [`tune`] caps the arenas and fixes the mmap threshold once at start-up, before any thread
//! exists; [`release`] hands free heap pages back to the kernel (`malloc_trim`), called by the
//! inbox after each dedupe archive and by the agent once a minute. Elsewhere than Linux with
//! glibc both are no-ops.

/// Arenas glibc may create (its default is 8 per core).
pub const ARENA_MAX: i32 = 2;
/// Blocks from this size up get their own mapping, returned to the kernel when freed.
pub const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Sets the allocator's limits. Call first thing in `main`, before any thread is started.
/// Returns whether every setting was accepted.
pub fn tune() -> bool {
    imp::tune()
}

/// Returns free heap memory to the kernel; blocking for up to a few milliseconds.
pub fn release() {
    imp::release()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod imp {
    pub fn tune() -> bool {
        // SAFETY: `mallopt` only changes glibc's allocator parameters; it takes plain integers
        // and is called before the process starts other threads.
        unsafe {
            let arenas = libc::mallopt(libc::M_ARENA_MAX, super::ARENA_MAX);
            let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, super::MMAP_THRESHOLD);
            arenas == 1 && mmap == 1
        }
    }

    pub fn release() {
        // SAFETY: `malloc_trim` takes the allocator's own locks and only returns free pages.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn tune() -> bool {
        true
    }

    pub fn release() {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn tuning_is_accepted_and_release_is_safe_under_use() {
        assert!(super::tune());
        let held: Vec<Vec<u8>> = (0..1000).map(|i| vec![1u8; 100 + i]).collect();
        drop(held);
        super::release();
        let v = vec![2u8; 1 << 20];
        assert_eq!(v.iter().map(|&b| usize::from(b)).sum::<usize>(), 2 << 20);
    }
}
