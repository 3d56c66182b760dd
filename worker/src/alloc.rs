//! Process-wide allocator tuning for the forward pass.
//!
//! Every op allocates its output, and activations of a batch are megabytes. glibc serves
//! allocations above its mmap threshold with fresh `mmap`s and returns them on free, so each op
//! paid for zero-filled page faults on memory it had just released: a quarter of the MiniLM
//! forward time. Raising the thresholds keeps freed activation memory in the heap for reuse.

/// Keeps freed memory up to a few hundred MiB in the process for reuse instead of returning it
/// to the system. Call once at start-up; a no-op outside glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 256 << 20;
        const TRIM_THRESHOLD: libc::c_int = 512 << 20;
        // SAFETY: mallopt only changes allocator parameters; it is called before the threads
        // that allocate heavily are started, and a rejected value leaves the defaults.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}
