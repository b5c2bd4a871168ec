//! A global allocator that keeps large freed blocks for reuse.
//!
//! A frame allocates the same large buffers every time (the UNet's maps, its attention's
//! projections, the convolutions' transforms: hundreds of blocks of 128 KiB to 130 MB). Above
//! its mmap threshold (32 MiB at most) glibc maps each one afresh and unmaps it on free, and
//! below it trims the heap's free top back to the kernel, so every frame faults the same memory
//! in again, 4 KiB at a time, and the kernel zeroes each page first: about 5 % of a three-step
//! frame at 512² on the CPU (docs/ARCHITECTURE.md, "Fresh pages"). [`ReusingAllocator`] keeps
//! freed blocks of [`MIN_REUSED_BYTES`] and more, up to a limit, and hands them back to the next
//! request of the same size class; everything smaller goes to the system allocator untouched.
//!
//! A library must not choose the process's allocator, so the crate only provides it: the C ABI
//! and the Python module (whose Rust allocations are their own) and the `sdstream` binary
//! install it; a Rust program opts in with (sdstream re-exports this module as `sdstream::alloc`)
//!
//! ```
//! #[global_allocator]
//! static ALLOCATOR: sdstream_kernels::alloc::ReusingAllocator =
//!     sdstream_kernels::alloc::ReusingAllocator::new();
//! # fn main() {}
//! ```
//!
//! The blocks kept are memory the process holds without using, at most the limit
//! ([`DEFAULT_LIMIT_BYTES`], or `SDSTREAM_REUSE_MB` megabytes read at the first large
//! allocation; `0` turns reuse off); [`release_kept`] gives them all back.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Smallest block kept for reuse: glibc's starting mmap threshold, so that nothing glibc would
/// map afresh bypasses the table. glibc raises that threshold (to 32 MiB at most) only when a
/// mapped block is freed back to it, which no longer happens here, so with a larger minimum the
/// blocks between the two were mapped and faulted in on every call (measured with 1 MiB: the
/// gemm crate's packing buffers faulted 5,400 pages a UNet call at 256² that they do not now).
pub const MIN_REUSED_BYTES: usize = 128 << 10;
/// Most bytes kept in freed blocks unless `SDSTREAM_REUSE_MB` says otherwise: a three-step
/// UNet call at 512² leaves 1.2 GB of them (480 MB with one step).
pub const DEFAULT_LIMIT_BYTES: usize = 2 << 30;
/// Alignment every kept block has at least: what glibc's malloc gives anyway. Blocks asked for
/// with more (the `gemm` crate's packing buffers ask for 128 bytes, a page at most) are kept
/// with theirs and serve requests of the same class and alignment; smaller alignments
/// are not raised, since that would turn the system's zeroed allocations from calloc (fresh
/// pages the kernel zeroes when first touched, never if never touched) into an aligned
/// allocation and a memset over every page.
const MIN_BLOCK_ALIGN: usize = 16;
/// Requests for more alignment than this pass through.
const MAX_BLOCK_ALIGN: usize = 4096;
/// Most blocks kept (a fixed table: the allocator must not allocate to track its blocks); a
/// UNet call at 512² leaves about 110.
const SLOTS: usize = 1024;
/// `limit` before it has been read from the environment.
const UNREAD: usize = usize::MAX;

/// Set by a [`ReusingAllocator`] with a non-zero limit at its first large allocation.
static REUSING: AtomicBool = AtomicBool::new(false);
/// Whether large freed blocks are being kept for reuse in this process (in this library, for
/// the C ABI and the Python module): a [`ReusingAllocator`] with a non-zero limit is the global
/// allocator and has served a large request. Kernels that cut work into pieces only to stay
/// out of freshly mapped memory ask this first.
pub fn reuses_large_blocks() -> bool {
    REUSING.load(Ordering::Relaxed)
}

/// The size a block of `size` bytes (≥ [`MIN_REUSED_BYTES`]) is allocated at: `size` rounded up
/// to an eighth of its power of two, so requests that differ by a little share blocks and at
/// most 12.5 % of a block is never asked for.
pub fn size_class(size: usize) -> usize {
    let power = usize::BITS - 1 - size.leading_zeros();
    let step = 1usize << power.saturating_sub(3);
    size.div_ceil(step) * step
}

#[derive(Clone, Copy)]
struct Block {
    class: usize,
    align: usize,
    ptr: *mut u8,
}

impl Block {
    fn layout(&self) -> Layout {
        // SAFETY: align is a power of two (a layout's, or MIN_BLOCK_ALIGN) and a class is far
        // below isize::MAX (a valid layout's size, rounded up by at most an eighth).
        unsafe { Layout::from_size_align_unchecked(self.class, self.align) }
    }

    /// The block a request of `layout` is served from (a kept one or a new one).
    fn for_request(layout: Layout, ptr: *mut u8) -> Self {
        Self {
            class: size_class(layout.size()),
            align: layout.align().max(MIN_BLOCK_ALIGN),
            ptr,
        }
    }
}

struct Kept {
    blocks: [Block; SLOTS],
    len: usize,
    bytes: usize,
}

// SAFETY: the pointers are blocks no one else holds; the table only moves them between threads
// under its mutex.
unsafe impl Send for Kept {}

/// The freed blocks kept (one table for the process, or for the library when it is a C ABI or
/// Python module: there is one global allocator).
static KEPT: Mutex<Kept> = Mutex::new(Kept {
    blocks: [Block {
        class: 0,
        align: MIN_BLOCK_ALIGN,
        ptr: std::ptr::null_mut(),
    }; SLOTS],
    len: 0,
    bytes: 0,
});
/// How many requests a kept block has served.
static REUSED: AtomicUsize = AtomicUsize::new(0);

/// Gives every kept block back to the system: for a host that is done with sdstream for a
/// while (the engine calls it when its worker stops).
pub fn release_kept() {
    let mut kept = lock();
    for block in &kept.blocks[..kept.len] {
        // SAFETY: a kept block was allocated by `System` with this layout and is not in use.
        unsafe { System.dealloc(block.ptr, block.layout()) };
    }
    kept.len = 0;
    kept.bytes = 0;
}

/// Bytes held in kept blocks now.
pub fn kept_bytes() -> usize {
    lock().bytes
}

/// How many freed blocks are kept now.
pub fn kept_blocks() -> usize {
    lock().len
}

/// How many requests kept blocks have served so far.
pub fn reuse_count() -> usize {
    REUSED.load(Ordering::Relaxed)
}

fn lock() -> std::sync::MutexGuard<'static, Kept> {
    // Nothing panics while the lock is held, but a poisoned table would still be a valid one.
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

/// A [`GlobalAlloc`] over the system allocator that keeps large freed blocks for reuse (see the
/// module docs).
pub struct ReusingAllocator {
    limit: AtomicUsize,
}

impl Default for ReusingAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl ReusingAllocator {
    /// An allocator whose limit comes from `SDSTREAM_REUSE_MB` (else [`DEFAULT_LIMIT_BYTES`]).
    pub const fn new() -> Self {
        Self::with_limit(UNREAD)
    }

    /// An allocator that keeps at most `limit` bytes of freed blocks, whatever the environment.
    pub const fn with_limit(limit: usize) -> Self {
        Self {
            limit: AtomicUsize::new(limit),
        }
    }

    /// The limit, read from the environment at the first call; it never changes after.
    fn limit(&self) -> usize {
        let mut limit = self.limit.load(Ordering::Relaxed);
        if limit == UNREAD {
            limit = limit_from_environment();
            self.limit.store(limit, Ordering::Relaxed);
        }
        if limit > 0 && !REUSING.load(Ordering::Relaxed) {
            REUSING.store(true, Ordering::Relaxed);
        }
        limit
    }

    /// Whether requests of `layout` are served from (and freed to) the kept blocks: large enough,
    /// an alignment the blocks can have, and a non-zero limit. The limit never changes once read,
    /// so a block is freed the way it was allocated.
    fn reuses(&self, layout: Layout) -> bool {
        layout.size() >= MIN_REUSED_BYTES && layout.align() <= MAX_BLOCK_ALIGN && self.limit() > 0
    }

    /// A block for a request of `layout` that [`reuses`](Self::reuses) says is served here: a
    /// kept one of its class (zeroed when asked), or a new one of the whole class.
    ///
    /// # Safety
    /// `layout` has a non-zero size (as every layout reaching a `GlobalAlloc` does).
    unsafe fn serve(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let block = Block::for_request(layout, std::ptr::null_mut());
        match (self.take(block), zeroed) {
            (Some(ptr), false) => ptr,
            (Some(ptr), true) => {
                // SAFETY: the block holds at least layout.size() bytes.
                unsafe { std::ptr::write_bytes(ptr, 0, layout.size()) };
                ptr
            }
            // SAFETY: a non-zero size, a power-of-two alignment.
            (None, false) => unsafe { System.alloc(block.layout()) },
            // SAFETY: as above; fresh pages come zeroed from the kernel.
            (None, true) => unsafe { System.alloc_zeroed(block.layout()) },
        }
    }

    /// A kept block for `request` (same class and alignment: a block goes back to the system
    /// with the layout it came with, which its next owner's free must give again), the most
    /// recently freed one (its pages are the likeliest to be in cache).
    fn take(&self, request: Block) -> Option<*mut u8> {
        let mut kept = lock();
        let len = kept.len;
        let (class, align) = (request.class, request.align);
        let at = kept.blocks[..len]
            .iter()
            .rposition(|b| b.class == class && b.align == align)?;
        let block = kept.blocks[at];
        kept.blocks.copy_within(at + 1..len, at);
        kept.len -= 1;
        kept.bytes -= class;
        drop(kept);
        REUSED.fetch_add(1, Ordering::Relaxed);
        Some(block.ptr)
    }

    /// Keeps a freed block, giving the oldest ones back to the system while the limit or the
    /// table would be exceeded (or this one, if it alone is over the limit).
    fn keep(&self, block: Block) {
        let limit = self.limit.load(Ordering::Relaxed);
        if block.class > limit {
            // SAFETY: allocated by `System` with this layout; the caller no longer uses it.
            unsafe { System.dealloc(block.ptr, block.layout()) };
            return;
        }
        let mut kept = lock();
        while kept.len == SLOTS || kept.bytes + block.class > limit {
            let oldest = kept.blocks[0];
            let len = kept.len;
            kept.blocks.copy_within(1..len, 0);
            kept.len -= 1;
            kept.bytes -= oldest.class;
            // SAFETY: as above; a kept block is in no one's use.
            unsafe { System.dealloc(oldest.ptr, oldest.layout()) };
        }
        let len = kept.len;
        kept.blocks[len] = block;
        kept.len += 1;
        kept.bytes += block.class;
    }
}

/// `SDSTREAM_REUSE_MB` as bytes, read without allocating (this runs inside the allocator).
fn limit_from_environment() -> usize {
    // SAFETY: getenv's result is either null or a NUL-terminated string that lives while the
    // environment is not changed; it is read at once.
    let value = unsafe { libc::getenv(c"SDSTREAM_REUSE_MB".as_ptr()) };
    if value.is_null() {
        return DEFAULT_LIMIT_BYTES;
    }
    // SAFETY: non-null, NUL-terminated (above).
    let bytes = unsafe { std::ffi::CStr::from_ptr(value) }.to_bytes();
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .map_or(DEFAULT_LIMIT_BYTES, |mb| mb.saturating_mul(1 << 20))
}

// SAFETY: every block handed out is either the system's own allocation for the request, or a
// block of at least the request's size and alignment that no one else holds (taken from the
// table under its lock); blocks return to the system with the layout they were allocated with.
unsafe impl GlobalAlloc for ReusingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !self.reuses(layout) {
            // SAFETY: forwarded as given.
            return unsafe { System.alloc(layout) };
        }
        // SAFETY: a request this allocator reuses blocks for.
        unsafe { self.serve(layout, false) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !self.reuses(layout) {
            // SAFETY: forwarded as given.
            return unsafe { System.alloc_zeroed(layout) };
        }
        // SAFETY: as in alloc.
        unsafe { self.serve(layout, true) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !self.reuses(layout) {
            // SAFETY: allocated by `System` with this layout (alloc forwarded it).
            return unsafe { System.dealloc(ptr, layout) };
        }
        self.keep(Block::for_request(layout, ptr));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees new_size rounded to the alignment does not overflow.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (self.reuses(layout), self.reuses(new_layout)) {
            // SAFETY: both sides are the system's own blocks.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            (true, true) if size_class(layout.size()) == size_class(new_size) => ptr,
            _ => {
                // SAFETY: a valid layout (above); the old block holds layout.size() bytes, the
                // new one new_size; they are distinct blocks.
                unsafe {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Size classes: never smaller than the request, at most an eighth larger, shared by
    /// requests that differ by less than a step.
    #[test]
    fn size_classes_round_up_by_at_most_an_eighth() {
        for size in [
            MIN_REUSED_BYTES,
            1 << 20,
            3 << 20,
            (3 << 20) + 1,
            126_000_000,
            1 << 40,
        ] {
            let class = size_class(size);
            assert!(
                class >= size && class - size <= size / 8,
                "{size} → {class}"
            );
            assert_eq!(size_class(class), class, "a class is its own class");
        }
        assert_eq!(size_class((3 << 20) + 1), size_class((3 << 20) + 200_000));
        assert_ne!(size_class(3 << 20), size_class((3 << 20) + 1));
    }

    /// A local instance driven by hand (the test binary keeps the system allocator): freed
    /// blocks come back to the next request of their class and alignment, zeroed when asked,
    /// grow in place within their class, and the limit gives the oldest back first.
    #[test]
    fn freed_blocks_serve_the_next_request_of_their_class() {
        let limit = 40 << 20;
        let a = ReusingAllocator::with_limit(limit);
        let layout = |size: usize, align: usize| Layout::from_size_align(size, align).unwrap();
        let reused_before = reuse_count();
        // SAFETY: every block is used within the size it was asked for and freed once, with
        // the layout it was allocated (or last reallocated) with.
        unsafe {
            let small = layout(100_000, 16);
            let first = a.alloc(layout(3_000_001, 16));
            std::ptr::write_bytes(first, 0xab, 3_000_001);
            a.dealloc(first, layout(3_000_001, 16));
            assert!(kept_bytes() >= size_class(3_000_001));
            // The same class (a little more, still inside it), zeroed on request.
            let second = a.alloc_zeroed(layout(3_000_100, 16));
            assert_eq!(
                second, first,
                "the kept block serves the next request of its class"
            );
            assert!(reuse_count() > reused_before);
            let bytes = std::slice::from_raw_parts(second, 3_000_100);
            assert!(bytes.iter().all(|&b| b == 0), "zeroed although reused");
            // Growing inside the class keeps the block; past it moves the contents.
            std::ptr::write_bytes(second, 7, 3_000_100);
            let grown = a.realloc(second, layout(3_000_100, 16), size_class(3_000_100));
            assert_eq!(grown, second);
            let moved = a.realloc(grown, layout(size_class(3_000_100), 16), 9_000_000);
            assert_ne!(moved, grown);
            let bytes = std::slice::from_raw_parts(moved, 9_000_000);
            assert!(bytes[..3_000_100].iter().all(|&b| b == 7), "contents moved");
            a.dealloc(moved, layout(9_000_000, 16));
            // Another alignment is another block; small blocks pass through.
            let aligned = a.alloc(layout(3_000_001, 128));
            assert_ne!(aligned, first);
            assert_eq!(aligned as usize % 128, 0);
            a.dealloc(aligned, layout(3_000_001, 128));
            let p = a.alloc(small);
            a.dealloc(p, small);
            // The limit: three 15 MB blocks do not fit 40 MB; the oldest goes back first.
            let big = layout(15_000_000, 16);
            let blocks: Vec<_> = (0..3).map(|_| a.alloc(big)).collect();
            for &b in &blocks {
                a.dealloc(b, big);
            }
            assert!(kept_bytes() <= limit, "{} kept over {limit}", kept_bytes());
            let again = a.alloc(big);
            assert_eq!(
                again, blocks[2],
                "the most recently freed block is served first"
            );
            a.dealloc(again, big);
        }
        release_kept();
        assert_eq!((kept_bytes(), kept_blocks()), (0, 0));
        assert!(reuses_large_blocks());
        // A zero limit keeps nothing.
        let none = ReusingAllocator::with_limit(0);
        // SAFETY: as above.
        unsafe {
            let big = layout(5_000_000, 16);
            let p = none.alloc(big);
            none.dealloc(p, big);
        }
        assert_eq!(kept_blocks(), 0);
    }
}
