//! Batch buffers kept for reuse. A pixel-series batch of the default bench cube is 2.6 MB, written once by a
//! reader. Taken fresh from the allocator, a buffer's pages are faulted in on that write, each cleared by the
//! kernel first, in the reader's time; and a loader built anew (each epoch of a script that builds one per
//! epoch, each round of `cubeload bench`) starts on memory the allocator has meanwhile given back to the
//! kernel. The batches' values and masks are taken from here instead, and their buffers come back when the
//! consumer is done with them: from the tensors of `cubeload-torch` and the arrays of the Python module when
//! those are freed, or from [`Batch::recycle`](crate::Batch::recycle). A batch simply dropped is freed as
//! before.
//!
//! One store per process, shared by its loaders, holding at most [`KEPT_BYTES`] of values and as much of
//! masks ([`kept_bytes`] says how much it holds); buffers under [`MIN_BYTES`] are left to the allocator,
//! which serves small blocks from pages it keeps.

use std::collections::VecDeque;

use super::PREFETCH_BYTES;

/// The most bytes kept: two default prefetch windows, so that a loader's batches in flight, given back when
/// it ends, all serve the next loader.
pub const KEPT_BYTES: usize = 2 * PREFETCH_BYTES;

/// Buffers smaller than this are not kept.
pub const MIN_BYTES: usize = 64 << 10;

/// The element types of batch buffers: values (`f32`) and mask bytes (`u8`).
pub trait Element: private::Sealed {}

impl Element for f32 {}
impl Element for u8 {}

mod private {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// The buffers of one type kept, oldest first.
    #[derive(Debug)]
    pub struct Kept<T> {
        pub(super) buffers: VecDeque<Vec<T>>,
        pub(super) bytes: usize,
    }

    /// Where the buffers of a type are kept (a trait of its own, so that only this module names them).
    pub trait Sealed: Sized + 'static {
        fn kept() -> &'static Mutex<Kept<Self>>;
    }

    static VALUES: Mutex<Kept<f32>> = Mutex::new(Kept::new());
    static MASKS: Mutex<Kept<u8>> = Mutex::new(Kept::new());

    impl Sealed for f32 {
        fn kept() -> &'static Mutex<Kept<f32>> {
            &VALUES
        }
    }

    impl Sealed for u8 {
        fn kept() -> &'static Mutex<Kept<u8>> {
            &MASKS
        }
    }
}

use private::Kept;

impl<T> Kept<T> {
    pub(super) const fn new() -> Self {
        Kept { buffers: VecDeque::new(), bytes: 0 }
    }

    /// The buffer given back last that holds `len` elements without being much larger (a buffer of twice
    /// the size would keep memory the smaller batch never uses).
    fn take(&mut self, len: usize) -> Option<Vec<T>> {
        let fits = |b: &Vec<T>| (len..=len + len / 2).contains(&b.capacity());
        let at = self.buffers.iter().rposition(fits)?;
        let buffer = self.buffers.remove(at)?;
        self.bytes -= bytes_of(&buffer);
        Some(buffer)
    }

    /// Keeps `buffer` (empty); returns the oldest buffers beyond [`KEPT_BYTES`], to be freed by the caller
    /// outside the lock.
    fn put(&mut self, buffer: Vec<T>) -> Vec<Vec<T>> {
        self.bytes += bytes_of(&buffer);
        self.buffers.push_back(buffer);
        let mut freed = Vec::new();
        while self.bytes > KEPT_BYTES
            && let Some(old) = self.buffers.pop_front()
        {
            self.bytes -= bytes_of(&old);
            freed.push(old);
        }
        freed
    }
}

fn bytes_of<T>(buffer: &Vec<T>) -> usize {
    buffer.capacity() * size_of::<T>()
}

fn lock<T: Element>() -> std::sync::MutexGuard<'static, Kept<T>> {
    static FORK_SAFE: std::sync::Once = std::sync::Once::new();
    FORK_SAFE.call_once(fork_safe);
    lock_now()
}

fn lock_now<T: Element>() -> std::sync::MutexGuard<'static, Kept<T>> {
    // The lock guards plain vectors: a panic elsewhere while it was held leaves them consistent.
    <T as private::Sealed>::kept().lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

std::thread_local! {
    /// The store's locks, held by the thread that forks from just before the fork to just after it.
    static HELD_ACROSS_FORK: std::cell::RefCell<Option<Held>> = const { std::cell::RefCell::new(None) };
}

type Held = (std::sync::MutexGuard<'static, Kept<f32>>, std::sync::MutexGuard<'static, Kept<u8>>);

/// Makes a `fork` (Python's `os.fork`, a `DataLoader` starting its workers) wait until no thread holds the
/// store's locks, and hold them across it: a child forked while a reader thread held one would find it held
/// by a thread it does not have, and wait for it forever on its first batch or freed array.
fn fork_safe() {
    extern "C" fn prepare() {
        HELD_ACROSS_FORK.with(|held| *held.borrow_mut() = Some((lock_now(), lock_now())));
    }
    extern "C" fn release() {
        HELD_ACROSS_FORK.with(|held| drop(held.borrow_mut().take()));
    }
    // SAFETY: the handlers are plain functions of this module, valid for the process's life; `prepare`
    // runs in the forking thread, which holds neither lock then (a fork is never made while taking or giving
    // back a buffer), and `release` runs in that same thread in the parent and in the child.
    unsafe {
        libc::pthread_atfork(Some(prepare), Some(release), Some(release));
    }
}

/// An empty buffer for `len` elements: one given back, or a new one.
pub(crate) fn take<T: Element>(len: usize) -> Vec<T> {
    if len * size_of::<T>() >= MIN_BYTES
        && let Some(buffer) = lock::<T>().take(len)
    {
        return buffer;
    }
    crate::allocator::on_huge_pages(|| Vec::with_capacity(len))
}

/// Gives `buffer` back, its contents dropped, for the batches of any loader of this process to be made in.
/// For a sink that takes a batch's buffer apart from the batch (a tensor that owns it); a whole batch is
/// given back by [`Batch::recycle`](crate::Batch::recycle).
pub fn give_back<T: Element>(mut buffer: Vec<T>) {
    if !kept_at_all(bytes_of(&buffer)) {
        return;
    }
    buffer.clear();
    let freed = lock::<T>().put(buffer);
    drop(freed);
}

/// Bytes of values and masks kept now, for the next batches of this process's loaders (at most twice
/// [`KEPT_BYTES`]: that much of each).
#[must_use]
pub fn kept_bytes() -> usize {
    lock::<f32>().bytes + lock::<u8>().bytes
}

/// Whether a buffer of `bytes` is kept when given back.
fn kept_at_all(bytes: usize) -> bool {
    (MIN_BYTES..=KEPT_BYTES).contains(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store of its own, so that tests running at once (and the loaders of other tests, which share the
    /// process's) do not take each other's buffers.
    fn kept() -> Kept<u8> {
        Kept::new()
    }

    #[test]
    fn the_buffer_given_back_last_that_fits_is_taken_again() {
        let mut kept = kept();
        let (a, b) = (Vec::<u8>::with_capacity(100_000), Vec::<u8>::with_capacity(100_000));
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        assert!(kept.put(a).is_empty() && kept.put(b).is_empty());
        assert_eq!(kept.bytes, 200_000);
        assert_eq!(kept.take(100_000).map(|v| v.as_ptr()), Some(pb), "last in, first out");
        assert_eq!(kept.take(90_000).map(|v| v.as_ptr()), Some(pa), "a little larger fits");
        assert!(kept.take(1000).is_none() && kept.bytes == 0);

        let big = Vec::<u8>::with_capacity(300_000);
        assert!(kept.put(big).is_empty());
        assert!(kept.take(100_000).is_none(), "three times the size is not taken for a smaller batch");
        assert!(kept.take(300_001).is_none(), "nor a buffer too small");
        assert_eq!(kept.take(250_000).map(|v| v.capacity()), Some(300_000));
    }

    #[test]
    fn the_oldest_buffers_beyond_the_bound_are_freed() {
        let mut kept = kept();
        let each = KEPT_BYTES / 4;
        let first = Vec::<u8>::with_capacity(each);
        let first_at = first.as_ptr();
        assert!(kept.put(first).is_empty());
        for _ in 0..3 {
            assert!(kept.put(Vec::with_capacity(each)).is_empty());
        }
        let freed = kept.put(Vec::with_capacity(each));
        assert_eq!(freed.len(), 1);
        assert_eq!(freed[0].as_ptr(), first_at, "the oldest goes");
        assert_eq!(kept.bytes, KEPT_BYTES);
    }

    /// Through the process's store: a buffer given back is taken again, emptied.
    #[test]
    fn buffers_given_back_serve_the_next_batches() {
        // A length no other test's batches come near, so that this test alone gives such buffers back.
        let len = 3_333_333;
        let mut buffer = take::<f32>(len);
        buffer.extend(std::iter::repeat_n(1.5f32, len));
        let at = buffer.as_ptr();
        give_back(buffer);
        let again = take::<f32>(len);
        assert_eq!((again.as_ptr(), again.len()), (at, 0), "the same memory, emptied");
        assert!(again.capacity() >= len);
    }

    /// A process forked while another thread holds the store's lock (here one giving buffers back and taking
    /// them again without pause) finds it unlocked in the child, as a `DataLoader` worker forked beside a
    /// running loader does when it builds its own or frees the arrays it inherited.
    #[test]
    fn a_forked_child_finds_the_store_unlocked() {
        use std::sync::atomic::{AtomicBool, Ordering};
        static STOP: AtomicBool = AtomicBool::new(false);
        let busy = std::thread::spawn(|| {
            while !STOP.load(Ordering::Relaxed) {
                give_back(take::<u8>(MIN_BYTES));
                std::hint::black_box(kept_bytes());
            }
        });
        let mut hung = 0;
        for _ in 0..200 {
            if hung > 0 {
                break;
            }
            // SAFETY: the child only takes the store's locks (no allocation) and exits without unwinding.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                std::hint::black_box(kept_bytes());
                // SAFETY: ends the child at once, running nothing of the parent's.
                unsafe { libc::_exit(0) };
            }
            assert!(pid > 0, "fork failed");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            let mut status = 0;
            // SAFETY: waits for (and if need be kills) the child just forked, by its pid.
            unsafe {
                while libc::waitpid(pid, &raw mut status, libc::WNOHANG) == 0 {
                    if std::time::Instant::now() > deadline {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, &raw mut status, 0);
                        hung += 1;
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        }
        STOP.store(true, Ordering::Relaxed);
        busy.join().unwrap();
        assert_eq!(hung, 0, "children waited forever on a lock their parent's thread held at the fork");
    }

    #[test]
    fn only_buffers_of_batch_sizes_are_kept() {
        assert!(!kept_at_all(MIN_BYTES - 1) && kept_at_all(MIN_BYTES), "small ones are the allocator's");
        assert!(kept_at_all(KEPT_BYTES) && !kept_at_all(KEPT_BYTES + 1), "one over the bound would free all");
    }
}
