//! The allocator of cubeload's binaries and Python module: mimalloc, with the loader's batch buffers on
//! transparent huge pages.
//!
//! Why mimalloc: batches and decoded chunks are megabytes each, allocated and freed hundreds of times a
//! second by different threads; glibc's allocator hands such blocks back to the kernel and takes them again
//! with page faults (a third of the loader's time in `cubeload bench`), mimalloc keeps reusing them.
//!
//! Why huge pages for batch buffers: a reader writes a batch with non-temporal stores to the lines of 8
//! samples at a time, each sample's row in a different 4 KiB page, so the stores miss the TLB page after
//! page; on 2 MiB pages a batch of the default bench cube lies in one. mimalloc's own memory stays on 4 KiB
//! pages (its `no_thp` feature): with huge pages everywhere, every fresh 2 MiB of each thread's heap is
//! cleared at its first touch, which cost more than it saved. So only the allocations the loader asks for,
//! its batch buffers, are mapped apart, 2 MiB-aligned and advised for huge pages; buffers given back are
//! kept by the loader's pool, so the mappings are made once and reused.
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOCATOR: cubeload::Allocator = cubeload::Allocator;
//! ```
//!
//! In a process with another global allocator, the loader works as well, its batches on that allocator's
//! pages.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use mimalloc::MiMalloc;

/// mimalloc, with the loader's batch buffers on transparent huge pages where they fill them (see the
/// module).
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocator;

/// A transparent huge page on `x86_64` and `aarch64` with 4 KiB base pages.
const HUGE_PAGE: usize = 2 << 20;

/// A base page.
const PAGE: usize = 4 << 10;

thread_local! {
    /// Whether this thread's next allocations are batch buffers ([`on_huge_pages`]). A constant
    /// initializer and no destructor: read from inside the allocator without allocating.
    static WANTED: Cell<bool> = const { Cell::new(false) };
}

/// Makes `make`'s allocations (a batch buffer) on huge pages where [`Allocator`] is the global allocator
/// and they fill them.
pub(crate) fn on_huge_pages<R>(make: impl FnOnce() -> R) -> R {
    /// Clears the request however `make` ends.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            WANTED.set(false);
        }
    }
    WANTED.set(true);
    let _reset = Reset;
    make()
}

/// The bytes of an allocation of `size` bytes to map on huge pages: all of it rounded up to whole huge pages
/// where that wastes at most an eighth of it (a batch of 256 × 672 × 3 float32, 1.97 MiB, takes one),
/// otherwise the whole huge pages it fills; 0 when none (such an allocation stays with mimalloc).
fn huge_bytes(size: usize) -> usize {
    let up = size.next_multiple_of(HUGE_PAGE);
    if up - size <= size / 8 { up } else { size / HUGE_PAGE * HUGE_PAGE }
}

/// The mappings made for huge pages: their addresses and lengths, so that a deallocation finds its own
/// (slots of 0 are free). More mappings at once than this are left to mimalloc.
struct Mappings {
    at: [AtomicUsize; SLOTS],
    len: [AtomicUsize; SLOTS],
}

const SLOTS: usize = 1024;

static MAPPINGS: Mappings =
    Mappings { at: [const { AtomicUsize::new(0) }; SLOTS], len: [const { AtomicUsize::new(0) }; SLOTS] };

impl Mappings {
    /// Records a mapping; false when every slot is taken.
    fn insert(&self, at: usize, len: usize) -> bool {
        for (slot, slot_len) in self.at.iter().zip(&self.len) {
            if slot.compare_exchange(0, at, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                slot_len.store(len, Ordering::Release);
                return true;
            }
        }
        false
    }

    /// Whether `at` is the start of a mapping made for huge pages.
    fn contains(&self, at: usize) -> bool {
        self.at.iter().any(|slot| slot.load(Ordering::Acquire) == at)
    }

    /// Forgets the mapping at `at` and gives its length; `None` for an address that is not one.
    fn remove(&self, at: usize) -> Option<usize> {
        let i = self.at.iter().position(|slot| slot.load(Ordering::Acquire) == at)?;
        let len = self.len[i].load(Ordering::Acquire);
        self.at[i].store(0, Ordering::Release);
        Some(len)
    }
}

/// Maps `size` bytes at a 2 MiB boundary (which meets any alignment up to 2 MiB), the first `huge` of them
/// advised for huge pages; `None` where the kernel refuses.
#[cfg(target_os = "linux")]
fn map_huge(size: usize, huge: usize) -> Option<*mut u8> {
    let len = size.next_multiple_of(PAGE).max(huge);
    // SAFETY: an anonymous private mapping, whose unaligned ends are unmapped again; the advice only
    // changes how the kernel backs the pages.
    unsafe {
        let raw = libc::mmap(
            std::ptr::null_mut(),
            len + HUGE_PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if raw == libc::MAP_FAILED {
            return None;
        }
        let start = raw as usize;
        let at = start.next_multiple_of(HUGE_PAGE);
        if at > start {
            libc::munmap(raw, at - start);
        }
        let end = start + len + HUGE_PAGE;
        if end > at + len {
            libc::munmap((at + len) as *mut libc::c_void, end - (at + len));
        }
        // Refused where the kernel has no transparent huge pages: 4 KiB pages then, as elsewhere.
        libc::madvise(at as *mut libc::c_void, huge, libc::MADV_HUGEPAGE);
        if MAPPINGS.insert(at, len) {
            Some(at as *mut u8)
        } else {
            libc::munmap(at as *mut libc::c_void, len);
            None
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn map_huge(_size: usize, _huge: usize) -> Option<*mut u8> {
    None
}

/// Unmaps `ptr` if it is one of the mappings made for huge pages; false otherwise.
fn unmap_huge(ptr: *mut u8) -> bool {
    // Mappings start at 2 MiB boundaries: any other address is mimalloc's, without a look at the table.
    if !(ptr as usize).is_multiple_of(HUGE_PAGE) {
        return false;
    }
    let Some(len) = MAPPINGS.remove(ptr as usize) else { return false };
    #[cfg(target_os = "linux")]
    // SAFETY: a mapping this allocator made and no longer hands out.
    unsafe {
        libc::munmap(ptr.cast(), len);
    }
    let _ = len;
    true
}

/// The huge-page mapping for `layout`, when asked for ([`on_huge_pages`]) and it fills at least one.
fn wanted_huge(layout: Layout) -> Option<*mut u8> {
    // `try_with`: an allocation while the thread's locals are being torn down is simply not wanted.
    if layout.align() > HUGE_PAGE || !WANTED.try_with(Cell::get).unwrap_or(false) {
        return None;
    }
    match huge_bytes(layout.size()) {
        0 => None,
        huge => map_huge(layout.size(), huge),
    }
}

// SAFETY: every block comes from mimalloc or from `map_huge`, and goes back to the one it came from
// (`unmap_huge` knows its own); both give blocks of at least the layout's size and alignment.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(ptr) = wanted_huge(layout) {
            return ptr;
        }
        // SAFETY: the caller's layout, as given.
        unsafe { MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // A fresh anonymous mapping reads as zeros.
        if let Some(ptr) = wanted_huge(layout) {
            return ptr;
        }
        // SAFETY: as in `alloc`.
        unsafe { MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !unmap_huge(ptr) {
            // SAFETY: a block of mimalloc's, with the layout it was allocated with.
            unsafe { MiMalloc.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !(ptr as usize).is_multiple_of(HUGE_PAGE) || !MAPPINGS.contains(ptr as usize) {
            // SAFETY: a block of mimalloc's, as the caller describes it.
            return unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        }
        // A mapped block: moved to mimalloc (batch buffers are not grown; this only keeps realloc whole).
        // SAFETY: `new_size` with the block's alignment is a valid layout (the caller's contract).
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let new = MiMalloc.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                unmap_huge(ptr);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    //! The unit tests run with [`Allocator`] as the global allocator (`lib.rs`), so vectors made here go
    //! through it as the binaries' do.
    use super::*;

    const MIB: usize = 1 << 20;

    /// Whether `at` is the start of one of the mappings made for huge pages.
    fn mapped(at: *const u8) -> bool {
        MAPPINGS.contains(at as usize)
    }

    /// The `VmFlags` of the mapping of this process that holds `at` (Linux), from `/proc/self/smaps`.
    #[cfg(target_os = "linux")]
    fn vm_flags(at: *const u8) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
            if let Some((start, end)) = range
                && let (Ok(start), Ok(end)) =
                    (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
            {
                inside = (start..end).contains(&(at as usize));
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.to_string());
            }
        }
        None
    }

    /// Whether the kernel can back memory with transparent huge pages at all.
    fn kernel_has_thp() -> bool {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| !s.contains("[never]"))
    }

    #[test]
    fn a_buffer_takes_whole_huge_pages_where_they_waste_at_most_an_eighth() {
        // A batch of the default bench cube (256 × 672 × 3 float32): one page.
        assert_eq!(huge_bytes(256 * 672 * 3 * 4), 2 * MIB);
        assert_eq!(huge_bytes(2 * MIB), 2 * MIB);
        assert_eq!(huge_bytes(7 * MIB + MIB / 2), 8 * MIB);
        // Its mask (a quarter of it) would waste three quarters of a page: none.
        assert_eq!(huge_bytes(256 * 672 * 3), 0);
        // A little over a page: that page, the rest on small pages.
        assert_eq!(huge_bytes(2 * MIB + MIB / 8), 2 * MIB);
        assert_eq!(huge_bytes(0), 0);
    }

    #[test]
    fn buffers_asked_for_are_mapped_apart_on_huge_pages_and_unmapped_when_freed() {
        let len = 1_000_000; // float32: 3.8 MiB, two huge pages
        let mut buffer: Vec<f32> = on_huge_pages(|| Vec::with_capacity(len));
        let at = buffer.as_ptr().cast::<u8>();
        assert!((at as usize).is_multiple_of(HUGE_PAGE));
        assert!(mapped(at));
        #[cfg(target_os = "linux")]
        if kernel_has_thp() {
            let flags = vm_flags(at).expect("the buffer's mapping");
            assert!(flags.split_whitespace().any(|f| f == "hg"), "not advised for huge pages: {flags}");
        }
        // Every byte is there to be written and read back.
        buffer.extend((0..len).map(|i| i as f32));
        assert_eq!(
            buffer.iter().map(|&x| f64::from(x)).sum::<f64>(),
            (0..len).map(|i| i as f64).sum::<f64>()
        );
        drop(buffer);
        assert!(!mapped(at));
    }

    #[test]
    fn other_allocations_stay_with_mimalloc() {
        // Not asked for: the same size.
        let plain: Vec<f32> = Vec::with_capacity(1_000_000);
        assert!(!mapped(plain.as_ptr().cast()));
        // Asked for, but filling no huge page.
        let mask: Vec<u8> = on_huge_pages(|| Vec::with_capacity(500_000));
        assert!(!mapped(mask.as_ptr()));
        // The request ends with the closure, even one that panics.
        let _ = std::panic::catch_unwind(|| on_huge_pages(|| panic!("in the closure")));
        let after: Vec<f32> = Vec::with_capacity(1_000_000);
        assert!(!mapped(after.as_ptr().cast()));
        assert!(!WANTED.with(Cell::get));
    }

    #[test]
    fn a_mapped_buffer_grown_moves_with_its_contents() {
        let mut buffer: Vec<u32> = on_huge_pages(|| Vec::with_capacity(600_000));
        let at = buffer.as_ptr().cast::<u8>();
        assert!(mapped(at));
        buffer.extend(0..600_000);
        buffer.reserve(1_000_000);
        assert!(!mapped(at), "the old mapping was not given back");
        assert!(buffer.iter().copied().eq(0..600_000));
    }
}
