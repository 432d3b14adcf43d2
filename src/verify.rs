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

use zarrs::array::Array;
use zarrs::filesystem::FilesystemStore;

use crate::cube::manifest::{FileRecord, Manifest};
use crate::cube::reader::Cube;
use crate::cube::reader::read_meta;
use crate::cube::{CubeError, CubeMeta, INDEX_GROUP, VariableMeta};
use crate::loader::LoaderError;
use crate::loader::assemble::{Assembler, Transform};
use crate::loader::sampler::ChunkId;

/// How [`verify`] begins the problem of a cube whose generation did not finish.
const INCOMPLETE: &str = "incomplete cube";

/// One thing wrong with a cube.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The variable or array (`-` for the cube as a whole).
    pub variable: String,
    /// The chunk, when the problem is one chunk's: `[time, lat, lon]` chunk indices (of its level's grid
    /// for a variable on a coarser level), as the loader names a chunk it cannot read. Problems of a whole
    /// file (a shard, in a sharded cube) name the file and its chunks in the message.
    pub chunk: Option<ChunkId>,
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
    /// Chunks decoded (each checked against its checksum).
    pub chunks: usize,
    /// Files of chunks (shards, in a sharded cube) compared with the manifest.
    pub files: usize,
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

    /// Whether the one thing wrong is that the cube's generation did not finish.
    #[must_use]
    pub fn only_incomplete(&self) -> bool {
        matches!(&self.problems[..], [only] if only.message.starts_with(INCOMPLETE))
    }
}

/// Checks the cube at `path`; see the module docs. Damage is reported in the [`VerifyReport`], not as an
/// error.
///
/// # Errors
/// [`CubeError::NotACube`] when `path` is not a cubeload cube at all; [`CubeError::Io`] when its manifest
/// cannot be read; [`CubeError::Zarr`] when its directory cannot be opened as a store.
pub fn verify(path: &Path) -> Result<VerifyReport, CubeError> {
    if let crate::store::Location::S3 { .. } = crate::store::Location::parse(path) {
        return Err(CubeError::NotACube {
            path: path.to_path_buf(),
            message: "verify reads the stored files directly: run it on a local copy of the cube".to_string(),
        });
    }
    let meta = read_meta(path)?;
    let mut report = VerifyReport {
        path: path.to_path_buf(),
        chunks: 0,
        files: 0,
        bytes: 0,
        sealed: false,
        problems: Vec::new(),
    };
    let mut problem = |variable: &str, chunk: Option<ChunkId>, message: String| {
        report.problems.push(Problem { variable: variable.to_string(), chunk, message });
    };
    if !meta.complete {
        problem("-", None, format!("{INCOMPLETE}: its completion marker is missing"));
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
    // Chunks are decoded by the loader's own reader, so that each is checked against its checksum (zarrs
    // does not check it when it reads part of a shard) and named as a training run would name it.
    let cube = Cube::open_unfinished(path)
        .map_err(|e| problem("-", None, format!("cannot be opened as the loader opens it: {e}")))
        .ok();
    let (mut chunks, mut stored_files, mut bytes) = (0, 0, 0);
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
        let reader = cube.as_ref().and_then(|cube| {
            match Assembler::new(cube, std::slice::from_ref(&v.name), Transform::default()) {
                Ok(reader) => {
                    // With the validity index read, a chunk not stored although it holds values is reported
                    // as lost. A damaged index is reported below, and the chunks are decoded without it.
                    if meta.complete {
                        let _ = reader.validity(cube);
                    }
                    Some(reader)
                }
                Err(e) => {
                    problem(&v.name, None, format!("cannot be read: {e}"));
                    None
                }
            }
        });
        let counts = meta.geometry(v).chunk_counts();
        for index in grid.indices() {
            let key = array.chunk_key(&index).as_str().to_string();
            let held = grid.chunks_in(&index, counts);
            stored_files += 1;
            // A file of one chunk is named by its chunk; a shard by its chunks, and its chunks are then read
            // one by one, to name those damaged.
            let (chunk, holding) = match &held[..] {
                [one] => (Some(*one), String::new()),
                [first, .., last] => (None, format!(" (holding chunks {first:?} to {last:?})")),
                [] => (None, String::new()),
            };
            match files.get(key.as_str()).map(|record| (record, record.check(path))) {
                Some((_, Some(why))) => {
                    problem(&v.name, chunk, format!("file {key}{holding}: {why}"));
                    if chunk.is_some() || !path.join(&key).exists() {
                        continue;
                    }
                }
                Some((record, None)) => bytes += record.len.unwrap_or(0),
                // An interrupted generation had not finished it: not written yet, or cut short as the run
                // stopped (its block is redone when the run resumes).
                None if !meta.complete => continue,
                None if manifest.header.is_some() => {
                    problem(&v.name, chunk, format!("file {key}{holding}: not in the manifest"));
                }
                None => {}
            }
            let Some(reader) = &reader else { continue };
            for id in held {
                chunks += 1;
                if let Err(e) = reader.decode_stored(0, id) {
                    let message = match e {
                        LoaderError::Read { message, .. } => message,
                        other => other.to_string(),
                    };
                    problem(&v.name, Some(id), message);
                }
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
    // Arrays with a file the seal found damaged or missing: named once, not again by the reads below.
    let mut named_by_seal = std::collections::HashSet::new();
    for file in manifest.sealed.iter().flatten() {
        match file.check(path) {
            Some(why) => {
                problem(node_of(&file.key), None, format!("file {}: {why}", file.key));
                named_by_seal.insert(node_of(&file.key).to_string());
            }
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
    for (name, len) in coordinates.iter().filter(|(name, _)| !named_by_seal.contains(name)) {
        let (name, len) = (name.as_str(), *len);
        match Array::open(store.clone(), &format!("/{name}")) {
            Ok(array) if array.shape() != [len as u64] => {
                problem(name, None, format!("length {:?}, the metadata says {len}", array.shape()));
            }
            Ok(array) if let Some(key) = missing_chunk_file(path, &array) => {
                problem(name, None, format!("file {key}: missing"));
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
            if named_by_seal.contains(&name) {
                continue;
            }
            let decoded = Array::open(store.clone(), &format!("/{name}"))
                .map_err(|e| e.to_string())
                .and_then(|array| match missing_chunk_file(path, &array) {
                    Some(key) => Err(format!("file {key}: missing")),
                    None => Ok(array),
                })
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
    report.files = stored_files;
    report.bytes = bytes + sealed_bytes;
    report.sealed = manifest.sealed.is_some();
    Ok(report)
}

/// The first chunk file of `array` not in the cube at `dir`. Coordinates and validity indexes are written
/// whole, never all fill values, so a file of theirs that is not there was lost, which zarrs would read as
/// fill values without a word (the seal of a cube of this version names it too; one of an earlier version
/// has none).
fn missing_chunk_file(dir: &Path, array: &Array<FilesystemStore>) -> Option<String> {
    chunk_indices(array.chunk_grid_shape()).into_iter().find_map(|index| {
        let key = array.chunk_key(&index).as_str().to_string();
        (!dir.join(&key).is_file()).then_some(key)
    })
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
    /// Chunks per stored chunk along the sharded axis (x, or samples in a shuffled cube).
    shard: usize,
    shuffled: bool,
    is_static: bool,
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
        StoredGrid { shape, outer, shard: shard as usize, shuffled: l.shuffled.is_some(), is_static }
    }

    /// The chunks, as the loader names them, of the stored chunk (shard) at `index`, given the variable's
    /// chunk counts `[time, lat, lon]` (batches along lat in a shuffled cube).
    fn chunks_in(&self, index: &[u64], [_, rows, cols]: [usize; 3]) -> Vec<ChunkId> {
        let index: Vec<usize> = index.iter().map(|&i| i as usize).collect();
        let along = |s: usize, n: usize| s * self.shard..((s + 1) * self.shard).min(n);
        match (self.shuffled, self.is_static, &index[..]) {
            (true, true, &[sb]) => along(sb, rows).map(|b| [0, b, 0]).collect(),
            (true, false, &[sb, t]) => along(sb, rows).map(|b| [t, b, 0]).collect(),
            (false, true, &[y, sx]) => along(sx, cols).map(|x| [0, y, x]).collect(),
            (false, false, &[t, y, sx]) => along(sx, cols).map(|x| [t, y, x]).collect(),
            _ => Vec::new(),
        }
    }

    /// Indices of every stored chunk, in row-major order.
    fn indices(&self) -> Vec<Vec<u64>> {
        let counts: Vec<u64> = self.shape.iter().zip(&self.outer).map(|(n, c)| n.div_ceil(*c)).collect();
        chunk_indices(&counts)
    }
}

/// Every index of a grid of `counts` chunks along each dimension, in row-major order.
fn chunk_indices(counts: &[u64]) -> Vec<Vec<u64>> {
    let mut all = vec![Vec::new()];
    for &count in counts {
        all = all
            .into_iter()
            .flat_map(|prefix| (0..count).map(move |i| [prefix.clone(), vec![i]].concat()))
            .collect();
    }
    all
}
