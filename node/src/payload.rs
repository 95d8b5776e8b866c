//! Content payloads from the network: received straight into memory aligned for direct IO, and
//! the block-sized ones reused.
//!
//! A fetch receives a gigabyte a block at a time. Allocating a fresh megabyte per block (zeroed
//! before it is read into, then copied once more into an aligned buffer for the disk) costs as
//! much CPU as decrypting it; a small pool of aligned buffers costs none of that.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use grid_protocol::content::BLOCK_SIZE;

/// Alignment of direct IO: of memory, file offsets and lengths.
pub const DIRECT_ALIGN: usize = 4096;
/// Payloads longer than this come from the pool.
const POOLED_MIN: usize = 64 << 10;
/// Buffers the pool keeps (each a block and a page): enough for a fetch's request window.
const POOL_MAX: usize = 64;
/// How long the pool keeps its buffers after the last was taken: a node between transfers
/// gives the memory back.
pub const POOL_IDLE: Duration = Duration::from_secs(30);

static POOL: Pool = Pool::new();

/// Block buffers kept for reuse.
struct Pool {
    buffers: Mutex<Vec<Vec<u8>>>,
    /// When a buffer was last taken, in milliseconds since the first use of [`clock_ms`].
    last_taken: AtomicU64,
}

fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Pool {
    const fn new() -> Pool {
        Pool { buffers: Mutex::new(Vec::new()), last_taken: AtomicU64::new(0) }
    }

    fn take(&self) -> Vec<u8> {
        self.last_taken.store(clock_ms(), Ordering::Relaxed);
        let pooled = self.buffers.lock().ok().and_then(|mut p| p.pop());
        pooled.unwrap_or_else(|| vec![0; BLOCK_SIZE + DIRECT_ALIGN])
    }

    fn give(&self, buffer: Vec<u8>) {
        if let Ok(mut pool) = self.buffers.lock()
            && pool.len() < POOL_MAX
        {
            pool.push(buffer);
        }
    }

    /// Frees every kept buffer when none was taken in the last `idle`; returns how many.
    fn release_if_idle(&self, idle: Duration) -> usize {
        let since = clock_ms().saturating_sub(self.last_taken.load(Ordering::Relaxed));
        if u128::from(since) < idle.as_millis() {
            return 0;
        }
        self.buffers.lock().map(|mut p| std::mem::take(&mut *p).len()).unwrap_or(0)
    }
}

/// Frees the kept block buffers when none was taken for [`POOL_IDLE`], and hands the freed
/// memory back to the system. Returns how many buffers were freed.
pub fn release_idle_buffers() -> usize {
    let freed = POOL.release_if_idle(POOL_IDLE);
    if freed > 0 {
        return_free_memory();
    }
    freed
}

/// Asks the allocator to return free memory to the system: glibc keeps freed megabyte buffers
/// in its arenas otherwise.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn return_free_memory() {
    // SAFETY: malloc_trim takes no pointers; it only releases the allocator's free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_free_memory() {}

/// Bytes received from a peer (or about to be sent to one).
pub struct Payload {
    raw: Vec<u8>,
    start: usize,
    len: usize,
    pooled: bool,
}

impl Payload {
    /// A payload of `len` bytes to read into: from the pool, aligned, when `len` is between
    /// 64 KiB and a block; its contents are unspecified until written.
    pub fn for_reading(len: usize) -> Payload {
        if !(POOLED_MIN..=BLOCK_SIZE).contains(&len) {
            return Payload { raw: vec![0; len], start: 0, len, pooled: false };
        }
        let raw = POOL.take();
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        Payload { raw, start, len, pooled: true }
    }

    /// The bytes followed by zeros up to the direct-IO alignment, when they sit aligned in
    /// memory (a pooled payload); else `None`.
    pub fn padded(&mut self) -> Option<&[u8]> {
        if !self.pooled {
            return None;
        }
        let end = self.start + self.len.next_multiple_of(DIRECT_ALIGN);
        if end > self.raw.len() {
            return None;
        }
        self.raw[self.start + self.len..end].fill(0);
        Some(&self.raw[self.start..end])
    }

    /// The aligned room for the bytes and their padding up to the direct-IO alignment, to read
    /// into (a pooled payload); else `None`.
    pub fn padded_mut(&mut self) -> Option<&mut [u8]> {
        let end = self.start + self.len.next_multiple_of(DIRECT_ALIGN);
        if !self.pooled || end > self.raw.len() {
            return None;
        }
        Some(&mut self.raw[self.start..end])
    }

    /// The bytes as a vector of their own.
    pub fn into_vec(mut self) -> Vec<u8> {
        if self.pooled {
            return self.to_vec();
        }
        std::mem::take(&mut self.raw)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(raw: Vec<u8>) -> Payload {
        let len = raw.len();
        Payload { raw, start: 0, len, pooled: false }
    }
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl DerefMut for Payload {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if self.pooled {
            POOL.give(std::mem::take(&mut self.raw));
        }
    }
}

impl Clone for Payload {
    fn clone(&self) -> Payload {
        Payload::from(self.to_vec())
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        **self == **other
    }
}

impl Eq for Payload {}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_payloads_are_aligned_padded_with_zeros_and_reused_without_leaking_old_bytes() {
        let mut a = Payload::for_reading(BLOCK_SIZE);
        a.fill(0xaa);
        assert_eq!(a.as_ptr() as usize % DIRECT_ALIGN, 0);
        drop(a);
        let mut b = Payload::for_reading(100_000);
        assert_eq!(b.len(), 100_000);
        b.fill(1);
        let padded = b.padded().expect("a pooled payload pads").to_vec();
        assert_eq!(padded.len(), 100_000usize.next_multiple_of(DIRECT_ALIGN));
        assert!(padded[..100_000].iter().all(|&x| x == 1));
        assert!(padded[100_000..].iter().all(|&x| x == 0), "the padding is zeros, not old bytes");
        assert_eq!(b.clone().into_vec(), vec![1u8; 100_000]);
        assert_eq!(b.into_vec().len(), 100_000);
        // Small payloads and vectors are plain.
        let mut small = Payload::for_reading(10);
        assert!(small.padded().is_none());
        assert_eq!(Payload::from(b"abc".to_vec()).into_vec(), b"abc");
    }

    #[test]
    fn the_pool_lets_its_buffers_go_only_after_an_idle_spell() {
        let pool = Pool::new();
        let (a, b) = (pool.take(), pool.take());
        pool.give(a);
        pool.give(b);
        assert_eq!(pool.release_if_idle(Duration::from_secs(3600)), 0, "just used");
        assert_eq!(pool.buffers.lock().unwrap().len(), 2);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(pool.release_if_idle(Duration::from_millis(10)), 2);
        assert!(pool.buffers.lock().unwrap().is_empty());
        // Taken again, it starts over.
        assert_eq!(pool.take().len(), BLOCK_SIZE + DIRECT_ALIGN);
        assert_eq!(pool.release_if_idle(Duration::from_secs(3600)), 0);
    }
}
