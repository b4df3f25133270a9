//! Settings of glibc's allocator for a process that runs members (see [`keep_freed_memory`]).

/// Tunes glibc's `malloc` for a long-running member: memory freed is kept for reuse instead
/// of being returned to the kernel at once (trim threshold 1 GiB), and blocks up to 32 MiB
/// come from the heap instead of a mapping of their own (mmap threshold). Returns whether
/// the settings took (false on other allocators and platforms, where it does nothing).
///
/// Why: a partition copy allocates and frees megabytes a second. Returning them to the
/// kernel and faulting them in again takes the process's address-space lock in write mode,
/// which every page fault of every thread also needs; with the copy's threads in the idle
/// scheduling class (`network.bulk_priority`), a copy thread that the kernel preempted
/// while holding that lock stalls the operations' threads behind it.
///
/// Measured with the `rebalance` harness (`--keep-freed-memory`, 1M entries, 3→4 members,
/// paced load, BENCHMARKS.md): p99 latency during the copy 2.3× its usual value against 3.4×
/// without, but the copy itself moved at 160 instead of 260 MB/s. A trade, so nothing in
/// grid calls it: a service that cares more about its latency during a rebalance than about
/// the rebalance's length can. Its resident memory then stays near its peak, as a JVM's
/// heap does.
///
/// Call it at the start of `main`; it changes process-wide state, so a library never calls
/// it on its own.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    {
        // SAFETY: `mallopt` takes two integers and changes only the allocator's tuning
        // parameters, under the allocator's own lock; no pointer is involved, and both
        // values are within the ranges glibc documents (the mmap threshold at most 32 MiB
        // on 64-bit targets). It returns 1 on success and 0 on a rejected value.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_settings_take_on_glibc() {
        let took = super::keep_freed_memory();
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(took);
        }
    }
}
