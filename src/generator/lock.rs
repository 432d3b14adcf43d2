//! The lock that keeps two runs of `gen` from writing one cube at once.
//!
//! Runs of one output share its staging directory (that is how an interrupted run is resumed), so two at
//! once would write the same block files and each swap the other's work into place. A run holds an
//! advisory lock (`flock`) on `.NAME.cubeload-lock` beside the output for its whole length: whole runs,
//! `--append` and `--finalize` alone, `--part` runs shared with each other (parts of one cube run at once by
//! design). The kernel releases it when the process ends, however it ends, so no stale lock outlives a
//! crash. The file is removed by the last holder; a run that opened it just before checks, once locked,
//! that it locked the file still at that path.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::{GenError, sibling};
use crate::cube::CubeError;

/// A held lock on an output's runs; released (and its file removed where no other run holds it) on drop.
#[derive(Debug)]
pub(super) struct RunLock {
    file: File,
    path: PathBuf,
}

impl RunLock {
    /// Locks `output`'s runs: shared with other `--part` runs when `shared`, alone otherwise.
    ///
    /// # Errors
    /// [`GenError::Busy`] when another run holds the lock; [`CubeError::Io`] naming the lock file when it
    /// cannot be made.
    pub(super) fn acquire(output: &Path, shared: bool) -> Result<RunLock, GenError> {
        let path = sibling(output, "cubeload-lock");
        let io = |source| CubeError::Io { path: path.clone(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        // The last holder may remove the file between our open and our lock: the lock is then on a file
        // no other run finds, and the one now at the path (if any) is the one to lock.
        for _ in 0..ATTEMPTS {
            let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io)?;
            match if shared { file.try_lock_shared() } else { file.try_lock() } {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    return Err(GenError::Busy { output: output.to_path_buf(), lock: path });
                }
                Err(TryLockError::Error(source)) => return Err(io(source).into()),
            }
            let lock = RunLock { file, path: path.clone() };
            if lock.at_path() {
                return Ok(lock);
            }
        }
        Err(io(std::io::Error::other("the lock file was replaced while being locked, again and again"))
            .into())
    }

    /// Whether the locked file is the one at the lock's path (not one removed and made anew meanwhile).
    fn at_path(&self) -> bool {
        let (held, now) = (self.file.metadata(), std::fs::metadata(&self.path));
        held.ok().zip(now.ok()).is_some_and(|(h, n)| (h.dev(), h.ino()) == (n.dev(), n.ino()))
    }
}

/// Whether a run of `gen` holds the lock on `output`'s runs now, read from the kernel's table of locks
/// (`/proc/locks`) rather than by trying the lock, which would turn away a run starting at that moment.
/// False where that table cannot be read.
#[must_use]
pub(crate) fn held(output: &Path) -> bool {
    let Ok(lock) = std::fs::metadata(sibling(output, "cubeload-lock")) else { return false };
    let Ok(table) = std::fs::read_to_string("/proc/locks") else { return false };
    let (major, minor) = (libc::major(lock.dev()), libc::minor(lock.dev()));
    let file = format!("{major:02x}:{minor:02x}:{}", lock.ino());
    // `1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF`: the file is the sixth field.
    table.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&file.as_str())
    })
}

/// Tries at locking the file at the lock's path before giving up.
const ATTEMPTS: usize = 16;

impl Drop for RunLock {
    fn drop(&mut self) {
        // Alone (a shared holder asks for the lock alone first, which fails while other parts hold theirs):
        // remove the file while holding the lock, so that a run that opened it sees it gone and retries.
        if self.file.try_lock().is_ok() && self.at_path() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_one_output_exclude_each_other_and_parts_share() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("nested").join("cube.zarr");
        let lock_file = dir.path().join("nested").join(".cube.zarr.cubeload-lock");

        let whole = RunLock::acquire(&output, false).unwrap();
        assert!(lock_file.exists());
        for shared in [false, true] {
            let err = RunLock::acquire(&output, shared).unwrap_err();
            assert!(matches!(&err, GenError::Busy { lock, .. } if *lock == lock_file), "{err}");
            assert!(err.to_string().contains("cube.zarr"), "{err}");
        }
        drop(whole);
        assert!(!lock_file.exists(), "the last holder removes the lock file");

        let (a, b) = (RunLock::acquire(&output, true).unwrap(), RunLock::acquire(&output, true).unwrap());
        assert!(matches!(RunLock::acquire(&output, false), Err(GenError::Busy { .. })));
        drop(a);
        assert!(lock_file.exists(), "a part still holds it");
        assert!(matches!(RunLock::acquire(&output, false), Err(GenError::Busy { .. })));
        drop(b);
        assert!(!lock_file.exists());
        drop(RunLock::acquire(&output, false).unwrap());
    }

    #[test]
    fn a_held_lock_is_seen_in_the_kernels_table_without_taking_it() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("cube.zarr");
        assert!(!held(&output), "no lock file");
        for shared in [false, true] {
            let lock = RunLock::acquire(&output, shared).unwrap();
            assert!(held(&output), "held (shared: {shared})");
            // Seeing it did not take it: a run may still start beside a part.
            if shared {
                drop(RunLock::acquire(&output, true).unwrap());
            }
            drop(lock);
        }
        // A lock file left behind, held by no one.
        std::fs::write(dir.path().join(".cube.zarr.cubeload-lock"), b"").unwrap();
        assert!(!held(&output));
    }

    #[test]
    fn a_lock_on_a_removed_file_is_taken_again_on_the_file_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("cube.zarr");
        let held = RunLock::acquire(&output, false).unwrap();
        // Another process's run, finished, removed the file and a third one made a new one: a lock taken on
        // the old file would exclude no one.
        std::fs::remove_file(&held.path).unwrap();
        let lock = RunLock::acquire(&output, false).unwrap();
        assert_eq!(lock.file.metadata().unwrap().ino(), std::fs::metadata(&lock.path).unwrap().ino());
        assert!(matches!(RunLock::acquire(&output, true), Err(GenError::Busy { .. })));
        drop(held);
        assert!(lock.path.exists(), "a holder removes only the file it locked");
        drop(lock);
        assert!(!output.with_file_name(".cube.zarr.cubeload-lock").exists());
    }
}
