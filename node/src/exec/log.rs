//! The captured log: the tail of a process's output in bounded memory.

use std::collections::VecDeque;

/// The last `cap` bytes of a stream, and how many bytes before them were dropped.
///
/// Memory never exceeds about `cap` bytes whatever the stream's length: a process printing
/// without end costs the node nothing but the copy.
#[derive(Debug)]
pub(crate) struct Tail {
    cap: usize,
    buf: VecDeque<u8>,
    dropped: u64,
}

impl Tail {
    /// An empty tail keeping at most `cap` bytes.
    pub(crate) fn new(cap: usize) -> Self {
        Tail { cap, buf: VecDeque::new(), dropped: 0 }
    }

    /// Appends `data`, dropping the oldest bytes beyond the cap.
    pub(crate) fn push(&mut self, mut data: &[u8]) {
        if data.len() > self.cap {
            let skip = data.len() - self.cap;
            self.dropped += skip as u64;
            data = &data[skip..];
        }
        let over = (self.buf.len() + data.len()).saturating_sub(self.cap);
        if over > 0 {
            self.buf.drain(..over);
            self.dropped += over as u64;
        }
        self.buf.extend(data);
    }

    /// Bytes dropped from the front so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Bytes held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// Bytes of memory reserved for the buffer.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The log as stored: a line stating the cut (when there was one), then the tail.
    pub(crate) fn into_log(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buf.len() + 80);
        if self.dropped > 0 {
            out.extend_from_slice(cut_notice(self.dropped).as_bytes());
        }
        let (a, b) = self.buf.as_slices();
        out.extend_from_slice(a);
        out.extend_from_slice(b);
        out
    }
}

/// The line that opens a log whose beginning was cut.
pub(crate) fn cut_notice(dropped: u64) -> String {
    format!("[grid: {dropped} bytes of earlier output dropped]\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_bytes_and_counts_the_rest() {
        let mut t = Tail::new(10);
        t.push(b"hello ");
        t.push(b"world!");
        assert_eq!(t.dropped(), 2);
        t.push(b"0123456789abcdef");
        assert_eq!(t.dropped(), 28 - 10);
        assert_eq!(t.len(), 10);
        let log = t.into_log();
        assert_eq!(log, [cut_notice(18).as_bytes(), b"6789abcdef"].concat());
    }

    #[test]
    fn memory_stays_near_the_cap() {
        let mut t = Tail::new(1 << 16);
        let chunk = vec![b'x'; 4096];
        for _ in 0..1000 {
            t.push(&chunk);
        }
        assert_eq!(t.len(), 1 << 16);
        assert!(t.capacity() <= 2 << 16, "capacity {}", t.capacity());
    }

    #[test]
    fn an_uncut_log_has_no_notice() {
        let mut t = Tail::new(100);
        t.push(b"short");
        assert_eq!(t.into_log(), b"short");
    }
}
