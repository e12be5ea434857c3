//! Keeping the agent's resident memory level under a steady load (glibc's allocator).
//!
//! The agent's live heap is small and bounded (sled's cache, the dedupe ids at 16 bytes each),
//! but with glibc's default settings its RSS kept climbing in a soak: memory freed by sled's
//! copy-on-write nodes and by the dedupe archive stayed with the allocator. Measured causes
//! (docs/benchmarks.md, "Agent memory"):
//! - one malloc arena per thread that ever allocated, up to 8 per core, each holding its own
//!   freed memory;
//! - glibc's *dynamic* mmap threshold: once a large block served by `mmap` is freed, the
//!   threshold rises to its size (up to 32 MB), so later buffers of that size (sled's I/O
//!   buffers, the dedupe list as it grows) come from the heap and leave holes there.
//!
//! [`tune`] caps the arenas and fixes the mmap and trim thresholds once at start-up, before any
//! thread exists. The agent does not call `malloc_trim`: it did once a minute and after each
//! dedupe archive, and each trim handed back pages that the next sled batches touched again,
//! so the RSS swung by 1-2 MB between samples (an 18 % spread in a soak, against 7 % without
//! the trims and with the fixed trim threshold, which keeps up to [`TRIM_THRESHOLD`] free at the
//! top of a heap for reuse). Elsewhere than Linux with glibc [`tune`] is a no-op.

/// Arenas glibc may create (its default is 8 per core).
pub const ARENA_MAX: i32 = 2;
/// Blocks from this size up get their own mapping, returned to the kernel when freed.
pub const MMAP_THRESHOLD: i32 = 128 * 1024;
/// Free memory at the top of a heap beyond this is returned to the kernel (glibc's default,
/// 128 KiB, made the heap shrink and grow again with every burst of sled batches).
pub const TRIM_THRESHOLD: i32 = 8 * 1024 * 1024;

/// Sets the allocator's limits. Call first thing in `main`, before any thread is started.
/// Returns whether every setting was accepted.
pub fn tune() -> bool {
    imp::tune()
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
            let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, super::TRIM_THRESHOLD);
            arenas == 1 && mmap == 1 && trim == 1
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn tune() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tuning_is_accepted_and_the_allocator_works_after_it() {
        assert!(super::tune());
        let held: Vec<Vec<u8>> = (0..1000).map(|i| vec![1u8; 100 + i]).collect();
        drop(held);
        let v = vec![2u8; 1 << 20];
        assert_eq!(v.iter().map(|&b| usize::from(b)).sum::<usize>(), 2 << 20);
    }
}
