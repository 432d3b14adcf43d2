//! Opening a cube, local or on an object store: one read of the root metadata (consolidated), refusal of
//! incomplete cubes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zarrs::array::{Array, ArrayShardedReadableExt, ArrayShardedReadableExtCache, CodecOptions};
use zarrs::metadata::ArrayMetadata;
use zarrs::storage::{ReadableStorage, ReadableStorageTraits, StoreKey};

use super::manifest::{MANIFEST_FILE, Manifest};
use super::{CubeError, CubeMeta};
use crate::plan::DType;
use crate::store::{Gone, Location, PinnedDir};

/// An opened, complete cube.
pub struct Cube {
    path: PathBuf,
    location: Location,
    store: ReadableStorage,
    meta: CubeMeta,
    slow: bool,
    /// Slow stores: array metadata from the root's consolidated metadata, so that opening an array costs no
    /// request (each would be a round trip before the first batch). Locally each array's own `zarr.json` is
    /// read, as the authoritative copy.
    arrays: HashMap<String, ArrayMetadata>,
    /// A local cube's directory, held open for the cube's reads.
    pinned: Option<Arc<PinnedDir>>,
    /// Whether the cube opened is gone since: its directory deleted, its root metadata replaced.
    gone: Option<Arc<dyn Gone>>,
}

impl std::fmt::Debug for Cube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cube").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Reads `subset` of a variable of any stored type as f64 (fill values stay as stored).
///
/// # Errors
/// The zarrs error when the region cannot be read or decoded.
pub fn read_f64<S: ?Sized + ReadableStorageTraits + 'static>(
    array: &Array<S>,
    dtype: DType,
    subset: &[std::ops::Range<u64>],
    options: &CodecOptions,
) -> Result<Vec<f64>, zarrs::array::ArrayError> {
    read_f64_cached(array, None, dtype, subset, options)
}

/// [`read_f64`], with the shard indexes read so far kept in `cache`: a shard's index is then read once,
/// not once per batch (one request instead of two per chunk on an object store).
///
/// # Errors
/// The zarrs error when the region cannot be read or decoded.
pub fn read_f64_cached<S: ?Sized + ReadableStorageTraits + 'static>(
    array: &Array<S>,
    cache: Option<&ArrayShardedReadableExtCache>,
    dtype: DType,
    subset: &[std::ops::Range<u64>],
    options: &CodecOptions,
) -> Result<Vec<f64>, zarrs::array::ArrayError> {
    fn widen<T: zarrs::array::ElementOwned + Into<f64>, S: ?Sized + ReadableStorageTraits + 'static>(
        array: &Array<S>,
        cache: Option<&ArrayShardedReadableExtCache>,
        subset: &[std::ops::Range<u64>],
        options: &CodecOptions,
    ) -> Result<Vec<f64>, zarrs::array::ArrayError> {
        let subset = subset.to_vec();
        let values: Vec<T> = match cache {
            Some(cache) => array.retrieve_array_subset_sharded_opt(cache, &subset, options)?,
            None => array.retrieve_array_subset_opt(&subset, options)?,
        };
        Ok(values.into_iter().map(Into::into).collect())
    }
    match dtype {
        DType::Float32 => widen::<f32, S>(array, cache, subset, options),
        DType::Uint8 => widen::<u8, S>(array, cache, subset, options),
        DType::Uint16 => widen::<u16, S>(array, cache, subset, options),
        DType::Int16 => widen::<i16, S>(array, cache, subset, options),
        DType::Uint32 => widen::<u32, S>(array, cache, subset, options),
        DType::Int32 => widen::<i32, S>(array, cache, subset, options),
    }
}

/// Reads the `cubeload` attribute of the group at `path`, complete or not.
///
/// # Errors
/// [`CubeError::NotACube`] when `path` is not a Zarr group made by cubeload.
pub fn read_meta(path: &Path) -> Result<CubeMeta, CubeError> {
    let location = Location::parse(path);
    let store = location.readable()?;
    read_meta_from(&store, &location)
}

fn read_meta_from(store: &ReadableStorage, location: &Location) -> Result<CubeMeta, CubeError> {
    read_root(store, location).map(|(meta, _)| meta)
}

/// The cube's metadata and the arrays' metadata consolidated in the root `zarr.json` (by path).
fn read_root(
    store: &ReadableStorage,
    location: &Location,
) -> Result<(CubeMeta, HashMap<String, ArrayMetadata>), CubeError> {
    let path = location.display_path();
    let not_a_cube = |message: String| CubeError::NotACube { path: path.clone(), message };
    if !crate::store::exists(location)? {
        return Err(not_a_cube(match location {
            Location::Local(path) if path.exists() => "not a Zarr v3 cube (no zarr.json)".to_string(),
            Location::Local(path) => {
                let staging = crate::generator::staging_dir(path);
                let previous = crate::generator::previous_dir(path);
                if crate::generator::run_in_progress(path) {
                    "no cube here yet: a run of `cubeload gen` is generating it now; it appears here when \
                     that run completes"
                        .to_string()
                } else if crate::generator::swap_interrupted(path) {
                    format!(
                        "no cube here now: a run of `cubeload gen` replacing it stopped as it swapped the new cube \
                         in; the previous cube is kept in {}, and the next run of `cubeload gen` puts it back",
                        previous.display()
                    )
                } else if crate::cube::manifest::holds_parts(&staging) {
                    format!(
                        "no cube here yet: parts of its generation (`--part K/N`) have run (their blocks are kept \
                         in {}); once every part has, `cubeload gen -c CONFIG --finalize` makes the cube",
                        staging.display()
                    )
                } else if staging.exists() {
                    format!(
                        "no cube here yet: its generation was interrupted (the finished part is kept in {}); \
                         run the same `cubeload gen -c CONFIG` again to resume it",
                        staging.display()
                    )
                } else {
                    crate::store::unsupported_url(path).unwrap_or_else(|| "no such cube".to_string())
                }
            }
            Location::S3 { .. } => "no such cube (no zarr.json under this prefix)".to_string(),
        }));
    }
    // Untrusted input: parsed and validated before anything is sized from it.
    let root = StoreKey::new("zarr.json").expect("valid key");
    let io = |e: &dyn std::fmt::Display| CubeError::Zarr { path: path.clone(), message: e.to_string() };
    let size = store.size_key(&root).map_err(|e| io(&e))?.unwrap_or(0);
    if size > super::validate::MAX_ROOT_JSON_BYTES {
        return Err(not_a_cube(format!("zarr.json is {size} bytes: not a cube's metadata")));
    }
    let bytes =
        store.get(&root).map_err(|e| io(&e))?.ok_or_else(|| not_a_cube("no zarr.json".to_string()))?;
    let meta = super::validate::meta_from_root_json(&path, &bytes)?;
    Ok((meta, consolidated_arrays(&bytes)))
}

/// The arrays of the root's consolidated metadata that parse; the others are opened from their own
/// `zarr.json` (and checked there).
fn consolidated_arrays(root_json: &[u8]) -> HashMap<String, ArrayMetadata> {
    let Ok(root) = serde_json::from_slice::<serde_json::Value>(root_json) else { return HashMap::new() };
    let Some(nodes) = root.pointer("/consolidated_metadata/metadata").and_then(|m| m.as_object()) else {
        return HashMap::new();
    };
    nodes
        .iter()
        .filter(|(_, node)| node.get("node_type").and_then(|t| t.as_str()) == Some("array"))
        .filter_map(|(path, node)| Some((path.clone(), serde_json::from_value(node.clone()).ok()?)))
        .collect()
}

/// Whether `path` holds a cube made by cubeload (complete or not): the only kind of directory cubeload will
/// ever delete or replace.
#[must_use]
pub fn is_cubeload_cube(path: &Path) -> bool {
    read_meta(path).is_ok()
}

impl Cube {
    /// Opens the cube at `path`: a directory, or `s3://bucket/prefix` (see [`crate::store`]).
    ///
    /// # Errors
    /// [`CubeError::NotACube`] for anything else, [`CubeError::Incomplete`] when generation did not finish.
    pub fn open(path: impl AsRef<Path>) -> Result<Cube, CubeError> {
        let location = Location::parse(path.as_ref());
        let slow = matches!(location, Location::S3 { .. });
        Cube::open_pinned(&location, slow, true)
    }

    /// Opens the cube at `path` (a directory) whether or not its generation finished: `verify` reads the
    /// chunks of an interrupted generation as the loader would read them.
    pub(crate) fn open_unfinished(path: &Path) -> Result<Cube, CubeError> {
        Cube::open_pinned(&Location::Local(path.to_path_buf()), false, false)
    }

    /// Opens the cube at `location`, a local one through its directory held open ([`PinnedDir`]): a loader
    /// reads the cube it opened, not one that `gen` puts in its place.
    fn open_pinned(location: &Location, slow: bool, complete: bool) -> Result<Cube, CubeError> {
        let pinned = match location {
            Location::Local(dir) => PinnedDir::open(dir),
            Location::S3 { .. } => None,
        };
        let (store, gone) = match &pinned {
            Some(pinned) => (pinned.store()?, Some(pinned.clone() as Arc<dyn Gone>)),
            None => location.readable_watched()?,
        };
        let mut cube = Cube::open_with(location, store, slow, complete)?;
        cube.pinned = pinned;
        cube.gone = gone;
        Ok(cube)
    }

    /// Opens the cube at `location` through `store` (e.g. a store wrapped to measure or to add latency),
    /// whose requests are taken to be slow.
    ///
    /// # Errors
    /// As [`Cube::open`].
    pub fn open_store(location: &Location, store: ReadableStorage) -> Result<Cube, CubeError> {
        Cube::open_with(location, store, true, true)
    }

    fn open_with(
        location: &Location,
        store: ReadableStorage,
        slow: bool,
        complete: bool,
    ) -> Result<Cube, CubeError> {
        let (meta, mut arrays) = read_root(&store, location)?;
        if !slow {
            arrays.clear();
        }
        let path = location.display_path();
        if complete && !meta.complete {
            return Err(CubeError::Incomplete { path });
        }
        Ok(Cube { path, location: location.clone(), store, meta, slow, arrays, pinned: None, gone: None })
    }

    /// Whether requests to the cube's store are slow (an object store, or a store given to
    /// [`Cube::open_store`]): readers then issue them concurrently.
    #[must_use]
    pub fn slow_requests(&self) -> bool {
        self.slow
    }

    /// The cube's metadata.
    #[must_use]
    pub fn meta(&self) -> &CubeMeta {
        &self.meta
    }

    /// Where the cube is.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cube, with what tells whether it is gone since it was opened through `gone`'s store (see
    /// [`crate::store::Location::readable_watched`]), where another store wraps that one.
    #[must_use]
    pub(crate) fn watched(mut self, gone: Option<Arc<dyn Gone>>) -> Cube {
        if gone.is_some() {
            self.gone = gone;
        }
        self
    }

    /// What tells whether the cube opened has been deleted or replaced since (`gen --overwrite`), to blame
    /// a read that failed on; none where that cannot be told (a store given to [`Cube::open_store`]).
    #[must_use]
    pub(crate) fn gone_probe(&self) -> Option<Arc<dyn Gone>> {
        self.gone.clone()
    }

    /// The cube's directory, held open, when it is read from a local file system (not through an object
    /// store or a store given to [`Cube::open_store`]): its files are read by [`PinnedDir::path`].
    #[must_use]
    pub fn local_dir(&self) -> Option<Arc<PinnedDir>> {
        self.pinned.clone().filter(|_| !self.slow)
    }

    /// The instants of the cube's time axis, decoded from its time coordinate (the steps of its real
    /// extent; none for a cube of static variables).
    ///
    /// # Errors
    /// [`CubeError::NotACube`] when the coordinate cannot be read or decoded.
    pub fn times(&self) -> Result<Vec<crate::time::Instant>, CubeError> {
        let steps = self.meta.shape[0];
        if self.meta.time.is_none() || steps == 0 {
            return Ok(Vec::new());
        }
        let fail = |message: String| CubeError::NotACube { path: self.path.clone(), message };
        let array = self.array("time")?;
        // Untrusted metadata: a chunk far larger than the axis would be allocated whole when decoded (the
        // other coordinates are checked as the loader opens them).
        let padded = self.meta.padded_shape[0] as u64;
        let chunk = array.chunk_shape(&[0]).ok().map(|c| c.first().map_or(0, |n| n.get()));
        if array.shape() != [padded] || chunk.is_none_or(|c| c > padded.max(1)) {
            let chunk = chunk.map_or_else(|| "no size".to_string(), |c| c.to_string());
            return Err(fail(format!(
                "its time coordinate is shaped {:?} in chunks of {chunk}, where the cube's axis has {padded} steps",
                array.shape()
            )));
        }
        let attribute = |key: &str| array.attributes().get(key).and_then(|a| a.as_str());
        let cf = crate::time::CfTime::parse(attribute("units").unwrap_or_default(), attribute("calendar"))
            .map_err(|e| fail(format!("its time coordinate: {e}")))?;
        let subset = zarrs::array::ArraySubset::new_with_shape(vec![steps as u64]);
        let values = array
            .retrieve_array_subset_opt::<Vec<i64>>(&subset, &crate::loader::assemble::one_thread())
            .map_err(|e| fail(format!("its time coordinate cannot be read: {e}")))?;
        values
            .into_iter()
            .map(|v| cf.to_instant(v as f64).map_err(|e| fail(format!("its time coordinate: {e}"))))
            .collect()
    }

    /// Opens the array `name` (a variable, a coordinate, or `cubeload_index/<var>`).
    ///
    /// # Errors
    /// [`CubeError::Zarr`] when it does not exist or cannot be read.
    pub fn array(&self, name: &str) -> Result<Array<dyn ReadableStorageTraits>, CubeError> {
        let fail = |e: &dyn std::fmt::Display| CubeError::Zarr {
            path: self.path.clone(),
            message: format!("array `{name}`: {e}"),
        };
        match self.arrays.get(name) {
            Some(metadata) => {
                Array::new_with_metadata(self.store.clone(), &format!("/{name}"), metadata.clone())
                    .map_err(|e| fail(&e))
            }
            None => Array::open(self.store.clone(), &format!("/{name}")).map_err(|e| fail(&e)),
        }
    }

    /// Bytes of all files of the cube (on object stores, as the manifest lists them: all of them in a sealed
    /// cube).
    #[must_use]
    pub fn bytes_on_disk(&self) -> u64 {
        fn walk(dir: &Path) -> u64 {
            std::fs::read_dir(dir).map_or(0, |entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| match e.file_type() {
                        Ok(t) if t.is_dir() => walk(&e.path()),
                        Ok(_) => e.metadata().map_or(0, |m| m.len()),
                        Err(_) => 0,
                    })
                    .sum()
            })
        }
        match &self.location {
            Location::Local(path) => walk(path),
            Location::S3 { .. } => {
                let key = StoreKey::new(MANIFEST_FILE).expect("valid key");
                let text =
                    self.store.get(&key).ok().flatten().map(|b| String::from_utf8_lossy(&b).to_string());
                text.map_or(0, |t| Manifest::stored_bytes(&t))
            }
        }
    }

    /// Uncompressed bytes of the variables' stored (padded) arrays.
    #[must_use]
    pub fn uncompressed_bytes(&self) -> u64 {
        self.meta
            .variables
            .iter()
            .map(|v| {
                let [t, y, x] = self.meta.geometry(v).padded_shape;
                let cells = if v.is_static { y * x } else { t * y * x };
                (cells * v.dtype.size()) as u64
            })
            .sum()
    }
}
