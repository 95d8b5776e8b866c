//! Keeping a lent machine's memory for its owner: glibc's allocator gives threads arenas of
//! their own and keeps what is freed for later, so a node that served a burst of connections
//! or shards would go on holding that memory while it idles. A node limits the arenas at start
//! ([`limit_arenas`]) and gives freed memory back now and then ([`trim`]). Elsewhere (another
//! libc) both do nothing.

/// Most malloc arenas: the scheduler thread and a blocking thread allocate without waiting on
/// each other; more threads share them.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MAX_ARENAS: libc::c_int = 2;

/// Limits the allocator's arenas. Call before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(unsafe_code, reason = "mallopt has no safe wrapper")]
pub fn limit_arenas() {
    // SAFETY: mallopt takes two integers and changes only the allocator's settings.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MAX_ARENAS);
    }
}

/// Returns the free memory of the allocator's heaps to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(unsafe_code, reason = "malloc_trim has no safe wrapper")]
pub fn trim() {
    // SAFETY: malloc_trim takes an integer and only releases memory nothing holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Limits the allocator's arenas (not with this libc).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas() {}

/// Returns free heap memory to the system (not with this libc).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}

#[cfg(test)]
mod tests {
    #[test]
    fn trimming_after_a_large_free_gives_the_memory_back() {
        fn rss_kib() -> u64 {
            let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
                .unwrap_or(0)
        }
        if !cfg!(all(target_os = "linux", target_env = "gnu")) {
            return;
        }
        // Many small blocks (below the mmap threshold, so they live in the heap), touched,
        // then freed but for the last: the heap cannot shrink from its top on its own.
        let mut blocks: Vec<Vec<u8>> = (0..10_000).map(|_| vec![1u8; 4000]).collect();
        let keep = blocks.pop();
        let before = rss_kib();
        drop(blocks);
        super::trim();
        let after = rss_kib();
        drop(keep);
        assert!(after + 20_000 < before, "RSS {before} kB before the trim, {after} kB after");
    }
}
