//! Loader soak: many epochs and many early drops over a small synthetic cube. A test binary of its own, with
//! one test, so that the process-wide counts it checks (threads, open file descriptors, resident memory) are
//! the loader's alone: libtest would run other tests on parallel threads.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cubeload::loader::Loader;
use cubeload::{Config, GenOptions, Plan, generate};

/// Epochs of the memory phase, and the one after which memory must stay flat.
const EPOCHS: usize = 30;
const WARM_UP_EPOCHS: usize = 3;
/// Growth allowed after warm-up: allocator noise, far below one leaked batch per step (~11 MB per epoch).
const RSS_BOUND: u64 = 16 << 20;
/// A drop joins every reader thread: it must not take longer than one chunk read.
const DROP_BOUND: Duration = Duration::from_secs(2);

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn threads() -> usize {
    count("/proc/self/task")
}

fn open_fds() -> usize {
    count("/proc/self/fd")
}

/// Live threads named by the loader (`cubeload-reader-N`, cut to 15 bytes by the kernel).
fn reader_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("cubeload-reader"))
        .count()
}

/// `measure()` once it equals `expected`, or after a second: threads name themselves once they first run,
/// and `join` returns when a thread's id is released, a moment before the kernel removes it from /proc.
fn settled<T: PartialEq>(expected: &T, measure: impl Fn() -> T) -> T {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let now = measure();
        if now == *expected || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `(threads, descriptors, reader threads)`.
fn counts() -> (usize, usize, usize) {
    (threads(), open_fds(), reader_threads())
}

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf only reads a system constant.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// A 100 × 150 pixel, 48-hour demo cube in batches of 64 pixel series (247 batches per epoch).
fn cube(dir: &Path) -> PathBuf {
    let spec = cubeload::demo::DemoSpec { hours: 48, ..Default::default() };
    let text = cubeload::demo::write_inputs(dir, &spec)
        .unwrap()
        .replace("layout: { kind: pixel_series, batch: 256 }", "layout: { kind: pixel_series, batch: 64 }");
    let plan = Plan::new(Config::from_yaml(&text, Path::new("soak.yaml")).unwrap(), text.clone()).unwrap();
    generate(&plan, &GenOptions::default(), &|_, _| {}).unwrap().path
}

#[test]
fn loader_soak_memory_threads_descriptors_and_drops() {
    let dir = tempfile::tempdir().unwrap();
    let cube = cube(dir.path());
    // A hang fails the run instead of blocking it: the watchdog is started before the baseline is taken.
    let (done, watch) = crossbeam_channel::bounded::<()>(1);
    let watchdog = std::thread::spawn(move || {
        // A panic of the test drops the sender: that failure is the harness's to report.
        if let Err(crossbeam_channel::RecvTimeoutError::Timeout) = watch.recv_timeout(Duration::from_mins(10))
        {
            eprintln!("soak: no progress for 10 minutes: a loader hangs");
            std::process::exit(1);
        }
    });
    // Warm-up: lazily started pools (rayon's, used when coordinates are read) and caches.
    let per_epoch = Loader::builder(&cube).shuffle(0).build().unwrap().map(Result::unwrap).count();
    let (base_threads, base_fds) = (threads(), open_fds());

    // Many epochs: resident memory flat after warm-up.
    let mut loader =
        Loader::builder(&cube).shuffle(1).epochs(EPOCHS).threads(2).prefetch(4).mix(2).build().unwrap();
    assert_eq!(loader.batches_per_epoch(), per_epoch);
    let mut at_epoch = Vec::new();
    for (i, batch) in loader.by_ref().enumerate() {
        drop(batch.unwrap());
        if i == 10 {
            assert_eq!(settled(&2, reader_threads), 2, "two named reader threads while reading");
        }
        if (i + 1) % per_epoch == 0 {
            at_epoch.push(rss());
        }
    }
    assert_eq!(at_epoch.len(), EPOCHS);
    drop(loader);
    let warm = at_epoch[WARM_UP_EPOCHS - 1];
    let peak = *at_epoch[WARM_UP_EPOCHS..].iter().max().unwrap();
    eprintln!("soak: RSS after epoch {WARM_UP_EPOCHS}: {warm} B, peak after: {peak} B");
    assert!(peak <= warm + RSS_BOUND, "RSS grew from {warm} to {peak} bytes over {EPOCHS} epochs");
    let baseline = (base_threads, base_fds, 0);
    assert_eq!(settled(&baseline, counts), baseline, "after many epochs");

    // Drops at many points of the stream, with every kind of reader setup: prompt, and nothing left behind.
    let points =
        [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, per_epoch - 1, per_epoch, per_epoch + 1, 2 * per_epoch];
    for (threads_n, prefetch, mix) in [(0, 1, 1), (1, 1, 1), (2, 4, 1), (3, 2, 2), (4, 8, 3)] {
        for &k in &points {
            let mut loader = Loader::builder(&cube)
                .shuffle(k as u64)
                .epochs(3)
                .threads(threads_n)
                .prefetch(prefetch)
                .mix(mix)
                .build()
                .unwrap();
            assert_eq!(loader.by_ref().take(k).map(Result::unwrap).count(), k);
            let started = Instant::now();
            drop(loader);
            let took = started.elapsed();
            let setup = format!("threads {threads_n}, prefetch {prefetch}, mix {mix}, dropped after {k}");
            assert!(took < DROP_BOUND, "{setup}: the drop took {took:?}");
            assert_eq!(settled(&baseline, counts), baseline, "{setup}");
        }
    }
    done.send(()).unwrap();
    watchdog.join().unwrap();
}
