//! Making a finished cube durable before it is renamed into place.
//!
//! The staging directory and the rename keep a killed run from leaving something that looks complete, but
//! only while the machine stays up: after a power cut or a kernel crash the filesystem may have kept the
//! rename and not yet the chunks it points to. So every file and directory of the cube is flushed to storage
//! before the rename, and the output's parent directory after it.

use std::fs::File;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::cube::CubeError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CubeError + '_ {
    move |source| CubeError::Io { path: path.to_path_buf(), source }
}

/// Flushes every file under `dir`, then its directories (their entries), deepest first. Returns the number
/// of files flushed.
pub(super) fn sync_tree(dir: &Path) -> Result<usize, CubeError> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    let mut next = 0;
    while next < dirs.len() {
        let current = dirs[next].clone();
        next += 1;
        for entry in std::fs::read_dir(&current).map_err(io(&current))? {
            let entry = entry.map_err(io(&current))?;
            let kind = entry.file_type().map_err(io(&current))?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    // A cube has a file per shard: flushed from several threads, the device sees them queued together.
    files.par_iter().try_for_each(|path| sync(path))?;
    for path in dirs.iter().rev() {
        sync(path)?;
    }
    Ok(files.len())
}

/// Flushes the directory that holds `path` (its entry, after a rename).
pub(super) fn sync_parent(path: &Path) -> Result<(), CubeError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    sync(&parent)
}

fn sync(path: &Path) -> Result<(), CubeError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_a_tree_is_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cube.zarr");
        std::fs::create_dir_all(root.join("t2m/c/0")).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        for file in ["zarr.json", "t2m/zarr.json", "t2m/c/0/0", "t2m/c/0/1"] {
            std::fs::write(root.join(file), file).unwrap();
        }
        assert_eq!(sync_tree(&root).unwrap(), 4);
        sync_parent(&root).unwrap();
        let missing = sync_tree(&dir.path().join("absent")).unwrap_err();
        assert!(missing.to_string().contains("absent"), "{missing}");
    }
}
