//! Process-wide tuning of glibc's allocator for a server that moves tens of MB per value.
//!
//! A stored layer of an 8B-shape 8K-token block is ~23 MB on disk and 33.5 MB decoded.
//! RocksDB reads each blob into a fresh buffer; with glibc's defaults a buffer that size
//! is either `mmap`ed (above the dynamic mmap threshold) or handed back to the kernel by
//! the heap trim when freed, so every read faults in and zeroes ~6,000 new pages: on the
//! cold path that was a quarter of the load time on one thread and worse with sixteen
//! (the page faults of one process share locks). `cargo bench --bench cold_path`, 8B
//! shape, page cache, one thread: 0.59 GB/s with the defaults, 1.09-1.19 GB/s with the
//! settings below (2-core development machine, 2026-12-02); on the H200 host's 16 threads
//! the cold loader went from 6.74 to 8.76 GB/s (`--glibc-defaults` is the A/B).
//!
//! The price: an arena keeps up to [`TRIM_THRESHOLD`] of freed memory for its next
//! allocations instead of returning it at once (glibc makes at most 8 arenas per core;
//! the readers and the compute pool use about one per thread), and requests up to 32 MB
//! come from the arenas, where they can fragment. Memory stays reusable, not leaked.
//! CPU model speed with the same settings (as `GLIBC_TUNABLES`, `cargo bench --bench
//! model_speed -- --no-peer`, 2-core machine, two runs each): prefill of 512 tokens
//! 670-683 tok/s against 694-699 with the defaults (2-4% slower, near the noise), decode
//! after 512 tokens 100-108 against 101-106 tok/s.

/// Largest request glibc serves from its arenas instead of `mmap` (glibc's maximum for
/// this setting on 64-bit hosts): a stored layer's read buffer is reused, not faulted in.
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// Free memory at the top of an arena kept before it is given back to the kernel: above
/// one read buffer, so a freed buffer stays for the next read, and small enough that an
/// idle arena holds at most this much.
pub const TRIM_THRESHOLD: usize = 64 << 20;

/// Applies [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`] (glibc only; elsewhere nothing).
/// Call once at the start of `main`, before threads allocate. Returns whether both
/// settings were taken.
pub fn keep_large_buffers() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's parameters; both values are in the
        // ranges glibc accepts (it returns 0 and changes nothing otherwise).
        unsafe {
            let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
            let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
            mmap == 1 && trim == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_both_settings() {
        assert!(super::keep_large_buffers());
    }
}
