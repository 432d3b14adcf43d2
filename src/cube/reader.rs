//! Opening a cube: one read of the root metadata (consolidated), refusal of incomplete cubes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use zarrs::array::{Array, CodecOptions};
use zarrs::filesystem::FilesystemStore;

use super::{CubeError, CubeMeta};
use crate::plan::DType;

/// An opened, complete cube.
pub struct Cube {
    path: PathBuf,
    store: Arc<FilesystemStore>,
    meta: CubeMeta,
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
pub fn read_f64(
    array: &Array<FilesystemStore>,
    dtype: DType,
    subset: &[std::ops::Range<u64>],
    options: &CodecOptions,
) -> Result<Vec<f64>, zarrs::array::ArrayError> {
    fn widen<T: zarrs::array::ElementOwned + Into<f64>>(
        array: &Array<FilesystemStore>,
        subset: &[std::ops::Range<u64>],
        options: &CodecOptions,
    ) -> Result<Vec<f64>, zarrs::array::ArrayError> {
        Ok(array
            .retrieve_array_subset_opt::<Vec<T>>(&subset.to_vec(), options)?
            .into_iter()
            .map(Into::into)
            .collect())
    }
    match dtype {
        DType::Float32 => widen::<f32>(array, subset, options),
        DType::Uint8 => widen::<u8>(array, subset, options),
        DType::Uint16 => widen::<u16>(array, subset, options),
        DType::Int16 => widen::<i16>(array, subset, options),
        DType::Uint32 => widen::<u32>(array, subset, options),
        DType::Int32 => widen::<i32>(array, subset, options),
    }
}

/// Reads the `cubeload` attribute of the group at `path`, complete or not.
///
/// # Errors
/// [`CubeError::NotACube`] when `path` is not a Zarr group made by cubeload.
pub fn read_meta(path: &Path) -> Result<CubeMeta, CubeError> {
    let not_a_cube = |message: String| CubeError::NotACube { path: path.to_path_buf(), message };
    if !path.join("zarr.json").is_file() {
        return Err(not_a_cube(if path.exists() {
            "not a Zarr v3 cube (no zarr.json)".to_string()
        } else {
            "no such cube".to_string()
        }));
    }
    // Untrusted input: parsed and validated before anything is sized from it.
    let root = path.join("zarr.json");
    let size = std::fs::metadata(&root).map_err(|source| CubeError::Io { path: root.clone(), source })?.len();
    if size > super::validate::MAX_ROOT_JSON_BYTES {
        return Err(not_a_cube(format!("zarr.json is {size} bytes: not a cube's metadata")));
    }
    let bytes = std::fs::read(&root).map_err(|source| CubeError::Io { path: root, source })?;
    super::validate::meta_from_root_json(path, &bytes)
}

/// Whether `path` holds a cube made by cubeload (complete or not): the only kind of directory cubeload will
/// ever delete or replace.
#[must_use]
pub fn is_cubeload_cube(path: &Path) -> bool {
    read_meta(path).is_ok()
}

impl Cube {
    /// Opens the cube at `path`.
    ///
    /// # Errors
    /// [`CubeError::NotACube`] for anything else, [`CubeError::Incomplete`] when generation did not finish.
    pub fn open(path: impl AsRef<Path>) -> Result<Cube, CubeError> {
        let path = path.as_ref();
        let meta = read_meta(path)?;
        if !meta.complete {
            return Err(CubeError::Incomplete { path: path.to_path_buf() });
        }
        let store = Arc::new(
            FilesystemStore::new(path)
                .map_err(|e| CubeError::Zarr { path: path.to_path_buf(), message: e.to_string() })?,
        );
        Ok(Cube { path: path.to_path_buf(), store, meta })
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

    /// Opens the array `name` (a variable, a coordinate, or `cubeload_index/<var>`).
    ///
    /// # Errors
    /// [`CubeError::Zarr`] when it does not exist or cannot be read.
    pub fn array(&self, name: &str) -> Result<Array<FilesystemStore>, CubeError> {
        Array::open(self.store.clone(), &format!("/{name}"))
            .map_err(|e| CubeError::Zarr { path: self.path.clone(), message: format!("array `{name}`: {e}") })
    }

    /// Bytes of all files of the cube.
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
        walk(&self.path)
    }

    /// Uncompressed bytes of the variables' stored (padded) arrays.
    #[must_use]
    pub fn uncompressed_bytes(&self) -> u64 {
        let [t, y, x] = self.meta.padded_shape;
        self.meta
            .variables
            .iter()
            .map(|v| {
                let cells = if v.is_static { y * x } else { t * y * x };
                (cells * v.dtype.size()) as u64
            })
            .sum()
    }
}
