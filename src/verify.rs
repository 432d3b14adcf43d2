//! `cubeload verify`: is the cube on disk the cube that was written?
//!
//! Three independent checks, so that each kind of damage is caught by at least one:
//! - every file against its length and CRC32C in the manifest: the chunks (or shards) of each block, and
//!   the files the manifest's seal lists (metadata, statistics, coordinates, validity index): truncation,
//!   bit rot, an edit, a file from another cube, a missing file;
//! - every chunk decoded through its codecs (each chunk carries its own crc32c codec): damage inside a file
//!   the manifest does not know about;
//! - the arrays' shapes and the coordinates' lengths against the cube's metadata, and every coordinate and
//!   index array decoded (which is all that is checked of them in a cube of an earlier build, whose
//!   manifest has no seal).
//!
//! Problems are reported by variable and chunk index, as the loader reports a chunk it cannot read.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zarrs::array::{Array, CodecOptions};
use zarrs::filesystem::FilesystemStore;

use crate::cube::manifest::{FileRecord, Manifest};
use crate::cube::reader::{read_f64, read_meta};
use crate::cube::{CubeError, CubeMeta, INDEX_GROUP, VariableMeta};

/// One thing wrong with a cube.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The variable or array (`-` for the cube as a whole).
    pub variable: String,
    /// Index of the stored chunk (or shard) in the array's chunk grid, when the problem is one chunk's.
    pub chunk: Option<Vec<u64>>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.chunk {
            Some(chunk) => write!(f, "variable `{}`, chunk {chunk:?}: {}", self.variable, self.message),
            None if self.variable == "-" => write!(f, "{}", self.message),
            None => write!(f, "variable `{}`: {}", self.variable, self.message),
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// The cube.
    pub path: PathBuf,
    /// Stored chunks (or shards) decoded.
    pub chunks: usize,
    /// Bytes of the files compared with the manifest.
    pub bytes: u64,
    /// Whether the manifest seals the files no block stored (cubes of earlier builds do not).
    pub sealed: bool,
    /// Everything wrong, in the order found.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// Whether nothing is wrong.
    #[must_use]
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the cube at `path`; see the module docs. Damage is reported in the [`VerifyReport`], not as an
/// error.
///
/// # Errors
/// [`CubeError::NotACube`] when `path` is not a cubeload cube at all.
pub fn verify(path: &Path) -> Result<VerifyReport, CubeError> {
    if let crate::store::Location::S3 { .. } = crate::store::Location::parse(path) {
        return Err(CubeError::NotACube {
            path: path.to_path_buf(),
            message: "verify reads the stored files directly: run it on a local copy of the cube".to_string(),
        });
    }
    let meta = read_meta(path)?;
    let mut report =
        VerifyReport { path: path.to_path_buf(), chunks: 0, bytes: 0, sealed: false, problems: Vec::new() };
    let mut problem = |variable: &str, chunk: Option<Vec<u64>>, message: String| {
        report.problems.push(Problem { variable: variable.to_string(), chunk, message });
    };
    if !meta.complete {
        problem("-", None, "incomplete cube: its completion marker is missing".to_string());
    }
    let manifest = Manifest::load(path)?;
    for line in &manifest.unreadable {
        problem(
            "-",
            None,
            format!(
                "the manifest is damaged: {line} cannot be read (the files of the block it recorded are \
                 reported below as not in the manifest)"
            ),
        );
    }
    if manifest.header.is_none() && manifest.unreadable.is_empty() {
        problem(
            "-",
            None,
            format!("no manifest ({}): stored files cannot be checked", crate::cube::manifest::MANIFEST_FILE),
        );
    }
    let files: HashMap<&str, &FileRecord> =
        manifest.records.iter().flat_map(|r| &r.files).map(|f| (f.key.as_str(), f)).collect();
    let store = Arc::new(
        FilesystemStore::new(path)
            .map_err(|e| CubeError::Zarr { path: path.to_path_buf(), message: e.to_string() })?,
    );
    let options = CodecOptions::default();
    let mut chunks = 0;
    let mut bytes = 0;
    for v in &meta.variables {
        let array = match Array::open(store.clone(), &format!("/{}", meta.geometry(v).array_path(&v.name))) {
            Ok(array) => array,
            Err(e) => {
                problem(&v.name, None, format!("cannot open the array: {e}"));
                continue;
            }
        };
        let grid = StoredGrid::of(&meta, v);
        if array.shape() != grid.shape.as_slice() {
            problem(&v.name, None, format!("shape {:?}, the metadata says {:?}", array.shape(), grid.shape));
            continue;
        }
        for index in grid.indices() {
            let key = array.chunk_key(&index).as_str().to_string();
            match files.get(key.as_str()) {
                Some(record) => {
                    if let Some(why) = record.check(path) {
                        problem(&v.name, Some(index.clone()), format!("file {key}: {why}"));
                        continue;
                    }
                    bytes += record.len.unwrap_or(0);
                }
                None if manifest.header.is_some() => {
                    problem(&v.name, Some(index.clone()), format!("file {key}: not in the manifest"));
                }
                None => {}
            }
            chunks += 1;
            if let Err(e) = read_f64(&array, v.dtype, &grid.subset(&index), &options) {
                problem(&v.name, Some(index), format!("file {key}: cannot be decoded: {e}"));
            }
        }
    }
    if meta.sealed && manifest.header.is_some() && manifest.sealed.is_none() {
        problem(
            "-",
            None,
            format!(
                "the manifest's last line, its seal of the metadata, coordinates and validity index, is missing \
                 or cut short: {} was truncated or edited, and those files cannot be checked",
                crate::cube::manifest::MANIFEST_FILE
            ),
        );
    }
    let mut sealed_bytes = 0;
    for file in manifest.sealed.iter().flatten() {
        match file.check(path) {
            Some(why) => problem(node_of(&file.key), None, format!("file {}: {why}", file.key)),
            None => sealed_bytes += file.len.unwrap_or(0),
        }
    }
    let [pt, py, px] = meta.padded_shape;
    let sample_major = meta.layout.shuffled.is_some();
    let mut coordinates =
        vec![("lat".to_string(), py), ("lon".to_string(), if sample_major { py } else { px })];
    for level in &meta.levels {
        let [_, ly, lx] = level.padded_shape;
        coordinates.push((format!("{}/lat", level.group), ly));
        coordinates.push((format!("{}/lon", level.group), lx));
    }
    if meta.time.is_some() {
        coordinates.push(("time".to_string(), pt));
        coordinates.extend(meta.levels.iter().map(|l| (format!("{}/time", l.group), l.padded_shape[0])));
    }
    for (name, len) in &coordinates {
        let (name, len) = (name.as_str(), *len);
        match Array::open(store.clone(), &format!("/{name}")) {
            Ok(array) if array.shape() != [len as u64] => {
                problem(name, None, format!("length {:?}, the metadata says {len}", array.shape()));
            }
            Ok(array) => {
                let whole: Vec<Range<u64>> = std::iter::once(0..len as u64).collect();
                let decoded = if name == "time" || name.ends_with("/time") {
                    array.retrieve_array_subset::<Vec<i64>>(&whole).map(|_| ())
                } else {
                    array.retrieve_array_subset::<Vec<f64>>(&whole).map(|_| ())
                };
                if let Err(e) = decoded {
                    problem(name, None, format!("cannot be decoded: {e}"));
                }
            }
            Err(e) => problem(name, None, format!("cannot open the coordinate: {e}")),
        }
    }
    if meta.complete {
        for v in &meta.variables {
            let name = format!("{INDEX_GROUP}/{}", v.name);
            let decoded = Array::open(store.clone(), &format!("/{name}"))
                .map_err(|e| e.to_string())
                .and_then(|array| {
                    let subset: Vec<Range<u64>> = array.shape().iter().map(|&n| 0..n).collect();
                    array.retrieve_array_subset::<Vec<f32>>(&subset).map(|_| ()).map_err(|e| e.to_string())
                });
            if let Err(e) = decoded {
                problem(&name, None, format!("validity index: {e}"));
            }
        }
    }
    report.chunks = chunks;
    report.bytes = bytes + sealed_bytes;
    report.sealed = manifest.sealed.is_some();
    Ok(report)
}

/// The array or group a stored file belongs to (`lat/c/0` → `lat`, `cubeload_index/t2m/zarr.json` →
/// `cubeload_index/t2m`), `-` for the cube's root.
fn node_of(key: &str) -> &str {
    let node = match key.find("/c/") {
        Some(at) => &key[..at],
        None => key.rsplit_once('/').map_or("", |(dir, _)| dir),
    };
    if node.is_empty() { "-" } else { node }
}

/// The grid of stored chunks (shards when sharded) of one variable, from the cube's metadata alone.
struct StoredGrid {
    shape: Vec<u64>,
    outer: Vec<u64>,
}

impl StoredGrid {
    fn of(meta: &CubeMeta, v: &VariableMeta) -> StoredGrid {
        let geometry = meta.geometry(v);
        let (l, is_static) = (geometry.layout, v.is_static);
        let [pt, py, px] = geometry.padded_shape.map(|n| n as u64);
        let (ct, cy, cx) = (l.chunk_t as u64, l.chunk_y as u64, l.chunk_x as u64);
        let shard = if is_static { l.static_shard_x } else { l.shard_x } as u64;
        let (shape, outer) = match (l.shuffled.is_some(), is_static) {
            (true, true) => (vec![py], vec![l.batch as u64 * shard]),
            (true, false) => (vec![py, pt], vec![l.batch as u64 * shard, ct]),
            (false, true) => (vec![py, px], vec![cy, cx * shard]),
            (false, false) => (vec![pt, py, px], vec![ct, cy, cx * shard]),
        };
        StoredGrid { shape, outer }
    }

    /// Indices of every stored chunk, in row-major order.
    fn indices(&self) -> Vec<Vec<u64>> {
        let counts: Vec<u64> = self.shape.iter().zip(&self.outer).map(|(n, c)| n.div_ceil(*c)).collect();
        let mut all = vec![Vec::new()];
        for &count in &counts {
            all = all
                .into_iter()
                .flat_map(|prefix| (0..count).map(move |i| [prefix.clone(), vec![i]].concat()))
                .collect();
        }
        all
    }

    /// The array region of the stored chunk at `index`.
    fn subset(&self, index: &[u64]) -> Vec<Range<u64>> {
        index
            .iter()
            .zip(self.outer.iter().zip(&self.shape))
            .map(|(&i, (&c, &n))| i * c..((i + 1) * c).min(n))
            .collect()
    }
}
