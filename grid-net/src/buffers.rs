//! Recycled buffers for bulk data: the chunks (about 1 MiB each) that partition copies are
//! encoded into on one member and received into on the other.
//!
//! A fresh buffer costs a page fault, and the zeroing of a page, for every 4 KiB written to
//! it, because the allocator hands memory of that size straight from the kernel and gives it
//! back when it is freed. A chunk lives for milliseconds (encoded, sent, acknowledged; or
//! received, rebuilt into a map), so a copy paid that for every byte, twice: a profile of a
//! 1M-entry copy (BENCHMARKS.md) spent 40% of all CPU in page faults, a third of them in such
//! buffers. Here a buffer goes back to a pool when the last [`Bytes`] made of it is dropped,
//! and the next chunk reuses its pages.
//!
//! The pool is process-wide and keeps at most [`KEPT_BYTES`] (64 MiB): the chunks of about
//! eight partition copies in flight at once. That much stays allocated after a rebalance.
//!
//! ```
//! use grid_net::buffers::BulkBuf;
//!
//! let mut buf = BulkBuf::with_capacity(1 << 20);
//! buf.extend_from_slice(b"a chunk");
//! let chunk = buf.freeze(); // a `Bytes`; the buffer returns to the pool when it is dropped
//! assert_eq!(&chunk[..], b"a chunk");
//! drop(chunk);
//! let again = BulkBuf::with_capacity(1 << 20); // the same pages, if no one took them
//! assert!(again.is_empty() && again.capacity() >= 1 << 20);
//! ```

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

use bytes::Bytes;

/// Buffers smaller than this are not worth keeping (the allocator recycles those itself).
pub const MIN_POOLED: usize = 64 * 1024;
/// Buffers larger than this are not kept (a chunk that grew around one huge entry).
pub const MAX_POOLED: usize = 8 << 20;
/// The most the pool keeps, in buffer capacity.
pub const KEPT_BYTES: usize = 64 << 20;

/// The free buffers and their total capacity.
static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: Vec::new(),
    bytes: 0,
});

struct Pool {
    free: Vec<Vec<u8>>,
    bytes: usize,
}

/// A byte buffer for bulk data that returns to a process-wide pool when dropped (see the
/// module's documentation). It is a `Vec<u8>` otherwise.
#[derive(Debug, Default)]
pub struct BulkBuf {
    buf: Vec<u8>,
}

impl BulkBuf {
    /// An empty buffer with room for at least `capacity` bytes: a pooled one if there is one
    /// big enough, else a new one.
    pub fn with_capacity(capacity: usize) -> Self {
        if (MIN_POOLED..=MAX_POOLED).contains(&capacity) {
            // Sizes in steps of 64 KiB: a received chunk is 1 MiB and part of an entry, a
            // little more or less each time, and a buffer kept for one must fit the next.
            let capacity = capacity.next_multiple_of(MIN_POOLED);
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = pool.free.iter().position(|b| b.capacity() >= capacity) {
                let buf = pool.free.swap_remove(i);
                pool.bytes -= buf.capacity();
                return Self { buf };
            }
            return Self {
                buf: Vec::with_capacity(capacity),
            };
        }
        Self {
            buf: Vec::with_capacity(capacity),
        }
    }

    /// The buffer as [`Bytes`], without a copy; it returns to the pool once the last clone
    /// or slice of those `Bytes` is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl Deref for BulkBuf {
    type Target = Vec<u8>;

    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl DerefMut for BulkBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl AsRef<[u8]> for BulkBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for BulkBuf {
    fn drop(&mut self) {
        let capacity = self.buf.capacity();
        if !(MIN_POOLED..=MAX_POOLED).contains(&capacity) {
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.bytes + capacity <= KEPT_BYTES {
            let mut buf = std::mem::take(&mut self.buf);
            buf.clear();
            pool.bytes += capacity;
            pool.free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests share the process-wide pool: one at a time, each starting from an empty one.
    /// (Other tests of this crate may take and return buffers meanwhile: the sizes here are
    /// ones they do not ask for, and the bound holds whatever they do.)
    fn empty_pool() -> std::sync::MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let mut pool = POOL.lock().unwrap();
        pool.free.clear();
        pool.bytes = 0;
        guard
    }

    #[test]
    fn a_dropped_buffer_is_reused_and_empty() {
        let _serial = empty_pool();
        // A size class near the top, which the crate's other tests do not use.
        let class = MAX_POOLED - 2 * MIN_POOLED;
        let mut a = BulkBuf::with_capacity(class - 10);
        assert_eq!(a.capacity(), class, "sizes go in steps of 64 KiB");
        a.extend_from_slice(&[1, 2, 3]);
        let ptr = a.as_ptr();
        let bytes = a.freeze();
        let slice = bytes.slice(1..);
        drop(bytes);
        // Still in use through the slice: a new buffer is another one.
        let b = BulkBuf::with_capacity(class);
        assert_ne!(b.as_ptr(), ptr);
        drop(slice);
        let c = BulkBuf::with_capacity(class);
        assert_eq!(c.as_ptr(), ptr, "the freed buffer is handed out again");
        assert!(c.is_empty());
        // A request of another size in the same step gets it too.
        drop(c);
        let c = BulkBuf::with_capacity(class - MIN_POOLED + 1);
        assert_eq!(c.as_ptr(), ptr);
        // One too small for the request is not handed out.
        drop(c);
        let d = BulkBuf::with_capacity(class + 1);
        assert_ne!(d.as_ptr(), ptr);
        drop((b, d));
    }

    #[test]
    fn small_and_huge_buffers_are_not_kept_and_the_pool_is_bounded() {
        let _serial = empty_pool();
        drop(BulkBuf::with_capacity(MIN_POOLED - 1));
        drop(BulkBuf::with_capacity(MAX_POOLED + 1));
        assert!(POOL
            .lock()
            .unwrap()
            .free
            .iter()
            .all(|b| (MIN_POOLED..=MAX_POOLED).contains(&b.capacity())));
        let many: Vec<BulkBuf> = (0..KEPT_BYTES / MAX_POOLED + 4)
            .map(|_| BulkBuf::with_capacity(MAX_POOLED))
            .collect();
        drop(many);
        let pool = POOL.lock().unwrap();
        assert!(pool.bytes <= KEPT_BYTES, "{} bytes kept", pool.bytes);
        assert!(pool.bytes >= KEPT_BYTES / 2, "{} bytes kept", pool.bytes);
        assert_eq!(
            pool.bytes,
            pool.free.iter().map(Vec::capacity).sum::<usize>()
        );
    }
}
