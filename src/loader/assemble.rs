//! Reading one batch: one chunk read per variable, then one pass that transposes the chunks into the batch
//! layout, normalizes, fills missing values and builds the mask.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::Arc;

use rand::seq::SliceRandom;
use zarrs::array::{
    Array, ArrayBytes, ArrayShardedExt, ArrayShardedReadableExt, ArrayShardedReadableExtCache,
};
use zarrs::storage::byte_range::ByteRange;
use zarrs::storage::{ReadableStorageTraits, StoreKey};

use super::buffers;
use super::sampler::{ChunkId, Job, rng_for};
use super::{LoaderError, Regrid};
use crate::batch::{Batch, BatchOrigin, NativeField};
use crate::config::{Upsampling, VariableKind};
use crate::cube::reader::{Cube, read_f64_cached};
use crate::cube::validate::{ArrayRole, check_array};
use crate::cube::{CubeError, CubeMeta, VariableMeta};
use crate::layout::{Layout, LayoutKind};
use crate::levels::Level;
use crate::loader::decode::{self, InShard, Progressive};
use crate::loader::interleave::{Series, interleave};
use crate::loader::regrid::{ChunkCache, Window, level_span, upsample};
use crate::loader::transpose::{
    Dest, Mask, Row, bits_to_mask, fence, prepare, prepare_block, stream_rows, transpose_rows,
    with_mask_staged,
};
use crate::plan::DType;
use crate::store::Presence;

/// How values are turned into model inputs. The default is the loader's: values as stored, missing values
/// as 0, statics repeated along time, `[B, ...]`, every variable on the target cells.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transform {
    /// `(x − mean) / std` from the cube's statistics (continuous variables only).
    pub normalize: bool,
    /// Replaces missing values (after normalization).
    pub fill: f32,
    /// Static variables in `Batch::statics` instead of repeated along time.
    pub separate_statics: bool,
    /// `[V, B, ...]` instead of `[B, ..., V, ...]`.
    pub variable_major: bool,
    /// Multi-resolution cubes: variables on a coarser level regridded onto the target cells in `data`, or at
    /// their native resolution in [`Batch::native`].
    pub regrid: Regrid,
}

/// A variable stored on a coarser level of a multi-resolution cube.
struct Coarse {
    level: Level,
    upsampling: Upsampling,
    /// Decoded level chunks, shared by the batches that need them.
    cache: ChunkCache,
}

/// Bytes of decoded level chunks kept, shared among the variables on levels (at least 8 MB each).
const LEVEL_CACHE_BYTES: usize = 256 << 20;

struct Var {
    meta: VariableMeta,
    coarse: Option<Coarse>,
    array: Array<dyn ReadableStorageTraits>,
    /// Shard indexes read so far (each shard's index is read once, not once per batch).
    shards: ArrayShardedReadableExtCache,
    /// The store read of a shard's index, as zarrs makes it (sharded arrays whose index layout is known).
    index_read: Option<ByteRange>,
    /// `(mean, 1/std)` when normalizing; `(0, 1)` leaves values as stored, bit for bit.
    affine: (f32, f32),
    /// Chunks are decoded from their encoded bytes here rather than by zarrs' pipeline ([`decode`]).
    direct: bool,
    /// The stored chunks end with a CRC32C (checked here for chunks zarrs decodes: it does not check it
    /// when reading part of a shard).
    checksummed: bool,
    /// The stored chunk's shape, and the inner chunk's in a shard, as [`Assembler::locate`] needs them for
    /// every chunk (zarrs rebuilds the inner shape from the codec's metadata at each call).
    stored_shapes: Option<(Vec<u64>, Option<Vec<u64>>)>,
    /// The variable's validity index (valid fraction per stored chunk), once [`Assembler::validity`] has
    /// read it: a chunk that is not stored although it has valid values was lost.
    index: std::sync::OnceLock<Vec<f32>>,
}

/// A batch chunk's valid fraction, as `min_valid` compares it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Validity {
    /// The batch chunk.
    pub id: ChunkId,
    /// Over its cells inside the cube (padding left out), averaged over the variables.
    pub fraction: f64,
    /// As versions before 2026-12-05 took it: over the whole chunk on the target grid, padding included.
    /// A resume state saved by one of them chose its batches by this.
    pub fraction_before: f64,
}

/// Reads and assembles batches of one cube; shared by the reader threads.
pub struct Assembler {
    meta: CubeMeta,
    vars: Vec<Var>,
    lat: Vec<f64>,
    lon: Vec<f64>,
    transform: Transform,
    path: std::path::PathBuf,
    /// The store's requests are slow (an object store): independent ones are made at once.
    slow: bool,
    /// Readers read from what fetch threads fetched ahead ([`Assembler::read_fetched`]).
    fetched: bool,
    /// The fetch threads' shard indexes, by (variable, shard): each read once, by the first fetcher that
    /// needs it, while fetchers needing other shards go on.
    shard_indexes: std::sync::Mutex<ShardIndexes>,
    /// The fetch threads' whole shards of static variables, by key ([`Assembler::static_shard`]).
    static_shards: std::sync::Mutex<StaticShards>,
    /// Bytes held there.
    static_shard_bytes: std::sync::atomic::AtomicU64,
    /// A local cube's directory, and the files kept open for its reads and read-ahead hints.
    local: Option<(Arc<crate::store::PinnedDir>, OpenFiles)>,
    /// Whether the cube opened is deleted or replaced since: a chunk that cannot be read then is no corrupt
    /// chunk but the end of the cube.
    gone: Option<Arc<dyn crate::store::Gone>>,
    /// Files kept open there at most ([`open_files_kept`]).
    open_files_kept: usize,
}

/// The files of a local cube kept open, by key.
type OpenFiles = std::sync::Mutex<HashMap<StoreKey, Arc<std::fs::File>>>;

/// Files of a local cube kept open for reads and read-ahead hints at most (one of them is closed to open
/// another when there would be more): an eighth of the process's limit on open files, the rest left to the
/// store's own reads, other loaders and the program; between 16 and 1024. A cube of small image-sequence
/// batches has hundreds of shard files, read in random order: with 64 kept, nearly every hint opened its
/// file again (path lookups were 5 % of the readers' time in `cubeload bench`).
#[must_use]
pub fn open_files_kept() -> usize {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit only writes the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } == 0 {
            return usize::try_from(limit.rlim_cur / 8).unwrap_or(usize::MAX).clamp(16, 1024);
        }
    }
    64
}

/// Largest shard of a static variable the fetch threads keep whole.
const STATIC_SHARD_BYTES: u64 = 16 << 20;

/// Bytes of static variables' shards the fetch threads keep at most, all variables together.
const STATIC_SHARDS_BYTES: u64 = 256 << 20;

/// The bytes of `range` within `bytes` (a whole shard's chunks), `None` when it lies outside them.
fn slice_of(bytes: &zarrs::storage::Bytes, range: ByteRange) -> Option<zarrs::storage::Bytes> {
    let ByteRange::FromStart(offset, Some(length)) = range else { return None };
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(length).ok()?)?;
    (end <= bytes.len()).then(|| bytes.slice(start..end))
}

type ShardIndexes =
    std::collections::HashMap<(usize, Vec<u64>), Arc<std::sync::OnceLock<Option<zarrs::storage::Bytes>>>>;

type StaticShards =
    std::collections::HashMap<StoreKey, Arc<std::sync::OnceLock<Option<zarrs::storage::Bytes>>>>;

/// A read of a byte range of a store key: `Ok(None)` where the store has no such key, `Err` where the store
/// failed (which a later read may not).
pub type StoreRead<'a> =
    &'a dyn Fn(&StoreKey, ByteRange) -> Result<Option<zarrs::storage::Bytes>, zarrs::storage::StorageError>;

/// A step of fetching ahead ([`Assembler::planned_reads`]).
#[derive(Debug)]
pub enum Planned {
    /// Read this range of this key from the store, for a reader.
    Fetch(StoreKey, ByteRange),
    /// Give a reader these bytes as this range of this key (a shard index, or a chunk of a static variable's
    /// shard, already held).
    Give(StoreKey, ByteRange, zarrs::storage::Bytes),
}

/// A chunk as its stored bytes give it ([`Assembler::stored_bytes`]).
enum Stored {
    /// Its bytes cannot be located (no shard index of the layout the loader knows, or one that cannot be
    /// read): zarrs reads the chunk, and reports why.
    Unlocated,
    /// Not stored, and the validity index agrees that it holds nothing.
    Absent,
    /// Its bytes, with the key and range they were read from.
    Bytes(StoreKey, ByteRange, zarrs::storage::Bytes),
}

/// Where a chunk's stored bytes lie ([`Assembler::locate`]).
enum Located {
    /// A whole stored object (the array is not sharded).
    Whole(StoreKey),
    /// In a shard: its key, the store read of its index and the index (empty when the shard is not stored),
    /// and the chunk there.
    InShard { key: StoreKey, index_range: ByteRange, index: zarrs::storage::Bytes, chunk: InShard },
    /// In a shard whose index is damaged (cut short, or not matching its checksum): what is wrong with it.
    Damaged { key: StoreKey, why: String },
}

/// The store read zarrs makes for the index of a shard of `array`: `16` bytes per inner chunk (offset and
/// length), plus a CRC32C when the index codecs hold one, at the end or the start of the shard. `None` when
/// the array is not sharded or its index is laid out otherwise.
pub(crate) fn shard_index_read(array: &Array<dyn ReadableStorageTraits>) -> Option<ByteRange> {
    let metadata = serde_json::to_value(array.metadata()).ok()?;
    let codecs = metadata.get("codecs")?.as_array()?;
    let [sharding] = codecs.as_slice() else { return None };
    let configuration = sharding.get("configuration")?;
    if sharding.get("name")?.as_str()? != "sharding_indexed" {
        return None;
    }
    let names: Vec<&str> = configuration
        .get("index_codecs")?
        .as_array()?
        .iter()
        .map(decode::codec_name)
        .collect::<Option<_>>()?;
    let checksum = match names.as_slice() {
        ["bytes"] => 0,
        ["bytes", "crc32c"] => 4,
        _ => return None,
    };
    // The index is read as little-endian numbers (`decode::chunk_in_shard`).
    let endian = &configuration["index_codecs"][0]["configuration"]["endian"];
    if !(endian.is_null() || endian == "little") {
        return None;
    }
    let zeros = vec![0; array.dimensionality()];
    let outer = array.chunk_shape(&zeros).ok()?;
    let inner = array.subchunk_shape()?;
    let chunks: u64 = outer.iter().zip(inner.iter()).map(|(o, i)| o.get() / i.get()).product();
    let length = chunks.checked_mul(16)?.checked_add(checksum)?;
    match configuration.get("index_location").and_then(|l| l.as_str()).unwrap_or("end") {
        "end" => Some(ByteRange::Suffix(length)),
        "start" => Some(ByteRange::FromStart(0, Some(length))),
        _ => None,
    }
}

impl std::fmt::Debug for Assembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembler").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Assembler {
    /// Opens the arrays of `variables` (all when empty) and reads the coordinates once.
    ///
    /// # Errors
    /// [`LoaderError::UnknownVariable`], or a cube error when an array cannot be opened.
    pub fn new(cube: &Cube, variables: &[String], transform: Transform) -> Result<Self, LoaderError> {
        let meta = cube.meta().clone();
        let names: Vec<String> = if variables.is_empty() {
            meta.variables.iter().map(|v| v.name.clone()).collect()
        } else {
            variables.to_vec()
        };
        let mut vars = Vec::new();
        for name in &names {
            let v = meta.variables.iter().find(|v| &v.name == name).ok_or_else(|| {
                LoaderError::UnknownVariable {
                    name: name.clone(),
                    available: meta.variables.iter().map(|v| v.name.clone()).collect(),
                }
            })?;
            // A spread too small for float32's 1/std (below ~3e-39, or none) is taken as none: the values
            // are centred only, as a constant field's are.
            let affine = match (transform.normalize, v.kind, v.stats) {
                (true, VariableKind::Continuous, Some(s)) if ((1.0 / s.std) as f32).is_finite() => {
                    (s.mean as f32, (1.0 / s.std) as f32)
                }
                (true, VariableKind::Continuous, Some(s)) => (s.mean as f32, 1.0),
                _ => (0.0, 1.0),
            };
            let array = checked_array(cube, ArrayRole::Variable(v), &meta.geometry(v).array_path(name))?;
            let shards = ArrayShardedReadableExtCache::new(&array);
            let on_levels = names
                .iter()
                .filter_map(|n| meta.variables.iter().find(|w| &w.name == n))
                .filter(|w| w.level.is_some())
                .count();
            let coarse = meta.geometry(v).level.map(|level| Coarse {
                level: level.clone(),
                upsampling: v.upsampling.unwrap_or(Upsampling::Nearest),
                cache: ChunkCache::new((LEVEL_CACHE_BYTES / on_levels.max(1)).max(8 << 20)),
            });
            let index_read = shard_index_read(&array);
            let direct = decode::is_direct(&array, v.fill_value);
            let checksummed = decode::ends_with_crc32c(&array);
            let dims = array.dimensionality();
            let stored_shapes = array.chunk_shape(&vec![0; dims]).ok().map(|outer| {
                let shape = |s: &[std::num::NonZeroU64]| s.iter().map(|n| n.get()).collect::<Vec<u64>>();
                (shape(&outer), array.subchunk_shape().map(|inner| shape(&inner)))
            });
            vars.push(Var {
                meta: v.clone(),
                coarse,
                array,
                shards,
                index_read,
                affine,
                direct,
                checksummed,
                stored_shapes,
                index: std::sync::OnceLock::new(),
            });
        }
        let read_coord =
            |role: ArrayRole<'_>, name: &str| -> Result<Vec<f64>, LoaderError> {
                let a = checked_array(cube, role, name)?;
                let whole = zarrs::array::ArraySubset::new_with_shape(a.shape().to_vec());
                a.retrieve_array_subset_opt::<Vec<f64>>(&whole, &one_thread()).map_err(|e| {
                    LoaderError::Read { variable: name.to_string(), chunk: [0, 0, 0], message: e.to_string() }
                })
            };
        // Both at once: on an object store each is a round trip before the first batch.
        let (lat, lon) = std::thread::scope(|scope| {
            let lat = scope.spawn(|| read_coord(ArrayRole::Lat, "lat"));
            let lon = read_coord(ArrayRole::Lon, "lon");
            (lat.join().unwrap_or_else(|p| std::panic::resume_unwind(p)), lon)
        });
        let (lat, lon) = (lat?, lon?);
        let slow = cube.slow_requests();
        Ok(Assembler {
            meta,
            vars,
            lat,
            lon,
            transform,
            path: cube.path().to_path_buf(),
            slow,
            fetched: false,
            shard_indexes: std::sync::Mutex::new(ShardIndexes::new()),
            static_shards: std::sync::Mutex::new(StaticShards::new()),
            static_shard_bytes: std::sync::atomic::AtomicU64::new(0),
            local: cube.local_dir().map(|dir| (dir, std::sync::Mutex::default())),
            gone: cube.gone_probe(),
            open_files_kept: open_files_kept(),
        })
    }

    /// Variables read per batch.
    #[must_use]
    pub fn variable_count(&self) -> usize {
        self.vars.len()
    }

    /// The cube's metadata.
    #[must_use]
    pub fn meta(&self) -> &CubeMeta {
        &self.meta
    }

    /// Names of the variables along `V` (time-varying first when statics are separate); variables delivered
    /// at their native resolution are in neither list.
    #[must_use]
    pub fn variable_names(&self) -> (Vec<String>, Vec<String>) {
        let separate = self.transform.separate_statics;
        let on_target = || self.vars.iter().filter(|v| !self.is_native(v));
        let dynamic = on_target().filter(|v| !(separate && v.meta.is_static)).map(|v| v.meta.name.clone());
        let statics = on_target().filter(|v| separate && v.meta.is_static).map(|v| v.meta.name.clone());
        (dynamic.collect(), statics.collect())
    }

    /// Names of every variable read, in the order asked: those of [`Self::variable_names`] and those
    /// delivered at their native resolution (what a resume asks for again).
    #[must_use]
    pub fn selected_names(&self) -> Vec<String> {
        self.vars.iter().map(|v| v.meta.name.clone()).collect()
    }

    /// Whether `v` is delivered at its native resolution in [`Batch::native`].
    fn is_native(&self, v: &Var) -> bool {
        self.transform.regrid == Regrid::Native && v.coarse.is_some()
    }

    /// Valid fraction of a batch chunk, over its cells inside the cube's extent (its padding left out): the
    /// mean over the selected variables of their stored fractions. A variable on a level
    /// has an index of its level chunks: a batch takes the largest fraction, padding left out, of the level
    /// chunks it reads (bilinear upsampling reaches one level cell past those under it), so that no batch
    /// with values of it counts as empty (one without may count as not empty).
    ///
    /// # Errors
    /// When the validity index cannot be read.
    pub fn validity(&self, cube: &Cube) -> Result<Vec<Validity>, LoaderError> {
        let [ct, cy, cx] = self.meta.chunk_counts();
        let mut sums = vec![0.0f64; ct * cy * cx];
        let mut sums_before = vec![0.0f64; ct * cy * cx];
        let read = |v: &Var| -> Result<Vec<f32>, LoaderError> {
            let name = format!("{}/{}", crate::cube::INDEX_GROUP, v.meta.name);
            let a = checked_array(cube, ArrayRole::Index(&v.meta), &name)?;
            let subset: Vec<std::ops::Range<u64>> = a.shape().iter().map(|&n| 0..n).collect();
            let values = a.retrieve_array_subset_opt::<Vec<f32>>(&subset, &one_thread()).map_err(|e| {
                LoaderError::Read { variable: name.clone(), chunk: [0, 0, 0], message: e.to_string() }
            })?;
            // Every fraction is stored (0 for a chunk without values): NaN, the index's fill value, is a
            // lost index chunk, which would otherwise leave every batch out of every epoch.
            if values.iter().any(|f| f.is_nan()) {
                return Err(LoaderError::Read {
                    variable: name.clone(),
                    chunk: [0, 0, 0],
                    message: format!(
                        "the validity index of `{}` is not stored (its chunk is lost): the batches with values \
                             cannot be told from those without; regenerate the cube",
                        v.meta.name
                    ),
                });
            }
            Ok(values)
        };
        // On an object store each index is a round trip before the first batch: 16 at a time.
        let indexes: Vec<Result<Vec<f32>, LoaderError>> = if self.slow {
            self.vars
                .chunks(16)
                .flat_map(|group| {
                    std::thread::scope(|scope| {
                        let readers: Vec<_> = group.iter().map(|v| scope.spawn(move || read(v))).collect();
                        let joined: Vec<_> = readers
                            .into_iter()
                            .map(|r| r.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                            .collect();
                        joined
                    })
                })
                .collect()
        } else {
            self.vars.iter().map(read).collect()
        };
        let batch = [self.meta.layout.chunk_y, self.meta.layout.chunk_x];
        // The stored fraction is over a chunk's cells, padding included: taken over its cells inside the
        // extent instead, so that an edge batch full of values is as full as any (`min_valid`). It is a
        // count in float32: taken back whole, a full edge chunk makes 1 exactly (`min_valid(1.0)`). Returns
        // that fraction and the one of the rule before (the whole chunk on the target grid, level chunks
        // not rounded), by which states saved then chose their batches.
        let of_cells_inside = |fraction: f64, layout: &crate::layout::Layout, shape, id, is_static| {
            let inside = layout.cells_inside(shape, id, is_static);
            if inside == 0 {
                return (0.0, 0.0);
            }
            let (all, inside) = (layout.chunk_cells(is_static) as f64, inside as f64);
            // A float32 share is off by up to `all / 2^24` cells: taken back whole, exact below 2^23 cells; in
            // a larger chunk, one full of values may read that many cells short.
            let count = (fraction * all).round();
            let count = if count + (all / f64::from(1u32 << 24)).round() >= inside { inside } else { count };
            ((count / inside).min(1.0), (fraction * all / inside).min(1.0))
        };
        for (v, values) in self.vars.iter().zip(indexes) {
            let values = values?;
            let _ = v.index.set(values.clone());
            let counts = self.meta.geometry(&v.meta).chunk_counts();
            let is_static = v.meta.is_static;
            let stored = |[it, iy, ix]: [usize; 3]| {
                let spatial = iy * counts[2] + ix;
                f64::from(values[if is_static { spatial } else { it * counts[1] * counts[2] + spatial }])
            };
            for (i, (sum, before)) in sums.iter_mut().zip(&mut sums_before).enumerate() {
                let id = [i / (cy * cx), (i / cx) % cy, i % cx];
                let (fraction, fraction_before) = match &v.coarse {
                    None => {
                        let (inside, _) =
                            of_cells_inside(stored(id), &self.meta.layout, self.meta.shape, id, is_static);
                        (inside, stored(id))
                    }
                    Some(c) => {
                        let level = &c.level;
                        let halo = c.upsampling == Upsampling::Bilinear && !self.is_native(v);
                        let (rows, cols) = level.chunks_read([id[1], id[2]], batch, halo);
                        let it = level.chunk_of(id)[0];
                        rows.flat_map(|ly| cols.clone().map(move |lx| [it, ly, lx]))
                            .map(|id| of_cells_inside(stored(id), &level.layout, level.shape, id, is_static))
                            .fold((0.0, 0.0), |(a, b), (x, y)| (f64::max(a, x), f64::max(b, y)))
                    }
                };
                *sum += fraction;
                *before += fraction_before;
            }
        }
        let n = self.vars.len().max(1) as f64;
        Ok((0..sums.len())
            .map(|i| Validity {
                id: [i / (cy * cx), (i / cx) % cy, i % cx],
                fraction: sums[i] / n,
                fraction_before: sums_before[i] / n,
            })
            .collect())
    }

    /// Asks the kernel to read the stored bytes of `chunks` into the page cache now, without waiting for
    /// them (`posix_fadvise(WILLNEED)`): when a reader comes to them they are in memory, and the disk
    /// works while the readers decode and assemble. A hint: local cubes on Linux only, errors ignored.
    pub fn hint(&self, chunks: &[ChunkId]) {
        for &id in chunks {
            for var in 0..self.vars.len() {
                self.hint_stored(var, id);
            }
        }
    }

    /// [`Assembler::hint`] for chunk `id` of variable `var` alone (one the loader decodes from its stored
    /// bytes).
    pub fn hint_stored(&self, var: usize, id: ChunkId) {
        if self.local.is_none() {
            return;
        }
        let v = &self.vars[var];
        if !v.direct || v.coarse.is_some() {
            return;
        }
        let storage = v.array.storage();
        let read = |key: &StoreKey, range| storage.get_partial(key, range);
        let (key, offset, length) = match self.locate(var, v, id, &read) {
            // A length of 0 is the whole file.
            Some(Located::Whole(key)) => (key, 0, 0),
            Some(Located::InShard {
                key,
                chunk: InShard::Stored(ByteRange::FromStart(offset, Some(length))),
                ..
            }) => (key, offset, length),
            _ => return,
        };
        let Some(Ok(file)) = self.local_file(&key) else { return };
        will_need(&file, offset, length);
    }

    /// The file of `key` in a local cube, kept open for the readers' reads and hints (opened and kept when it
    /// is not); `None` for a store that is not a local directory.
    fn local_file(&self, key: &StoreKey) -> Option<std::io::Result<Arc<std::fs::File>>> {
        let (dir, files) = self.local.as_ref()?;
        // The lock is held for the lookup only, not for the system calls: readers read and hint several files
        // per batch, and with the `open` inside it they queued on it (hundreds of sleeps per epoch of small
        // image-sequence batches).
        let lock = || files.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let open = lock().get(key).cloned();
        if let Some(file) = open {
            return Some(Ok(file));
        }
        let file = match std::fs::File::open(dir.path().join(key.as_str())) {
            Ok(file) => file,
            Err(e) => return Some(Err(e)),
        };
        let mut files = lock();
        // A cube may have more shard files than a process may hold open: the ones kept are bounded. One is
        // closed (any: batches come in random order) rather than all of them, which in a reader's path would
        // be up to a thousand `close` calls at once.
        let closed = if files.len() >= self.open_files_kept {
            let any = files.keys().next().cloned();
            any.and_then(|key| files.remove(&key))
        } else {
            None
        };
        let file = files.entry(key.clone()).or_insert_with(|| Arc::new(file)).clone();
        drop(files);
        drop(closed);
        Some(Ok(file))
    }

    /// The bytes of `range` of `key`: from the file kept open in a local cube (no `open` per read, as the
    /// store makes), else from the store; `None` when the store has no such key.
    fn read_stored_bytes(
        &self,
        storage: &dyn ReadableStorageTraits,
        key: &StoreKey,
        range: ByteRange,
    ) -> Result<Option<zarrs::storage::Bytes>, String> {
        #[cfg(unix)]
        if let ByteRange::FromStart(offset, length) = range
            && let Some(file) = self.local_file(key)
        {
            let file = match file {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(format!("{key}: {e}")),
            };
            let size = || file.metadata().map(|m| m.len()).map_err(|e| format!("{key}: {e}"));
            let length = match length {
                Some(length) => length,
                None => size()?.saturating_sub(offset),
            };
            // A length from a damaged shard index could ask for more memory than the machine has: past what
            // any chunk holds, it is checked against the file first.
            if length > LARGE_READ
                && offset.checked_add(length).is_none_or(|end| size().is_ok_and(|s| end > s))
            {
                return Err(format!(
                    "{key}: bytes {offset}.. ({length} of them) lie past the end of the file"
                ));
            }
            let bytes =
                read_exact_at(&file, offset, length).map_err(|e| format!("{key}: bytes {offset}..: {e}"))?;
            return Ok(Some(bytes.into()));
        }
        storage.get_partial(key, range).map_err(|e| e.to_string())
    }

    /// Reads one chunk of every variable as f32 with NaN for missing values (fill values and padding); the
    /// time-major float32 chunks of a pixel-series batch are left to be decoded as the batch is assembled
    /// ([`Chunk::Decoding`]).
    fn read_chunk(&self, id: ChunkId) -> Result<Vec<Chunk>, LoaderError> {
        let l = &self.meta.layout;
        let series = l.kind == LayoutKind::PixelSeries && l.shuffled.is_none();
        let read = |(i, v): (usize, &Var)| {
            let progressive = series && !v.meta.is_static && v.meta.dtype == DType::Float32;
            // A variable on a level is regridded from its level's chunks (each read as `read_stored` reads).
            let direct = if v.coarse.is_none() { self.read_direct(i, v, id, progressive)? } else { None };
            match direct {
                Some(chunk) => Ok(chunk),
                None => self.read_variable(v, id).map(Chunk::Decoded),
            }
        };
        self.vars.iter().enumerate().map(read).collect()
    }

    /// Readers take their chunks from what fetch threads fetched ahead (see [`Assembler::planned_reads`]):
    /// they then read each shard's index from there too, rather than through zarrs' index cache, which
    /// reads a missing index while holding its lock (one round trip there would stop every reader).
    pub fn read_fetched(&mut self, fetched: bool) {
        self.fetched = fetched;
    }

    /// What a fetch thread does so that reading `chunks` makes no request to a slow store: for each variable
    /// on the target grid, the chunk (unsharded), or its byte range in its shard, preceded by the shard's
    /// index given from the fetchers' own index cache (read once per shard, through `read`, without holding
    /// any lock others wait on); a static variable's chunk is given from its shard, read whole once
    /// (`Assembler::static_shard`). Level chunks, and chunks of shards whose index cannot be read or laid
    /// out, are left to the readers.
    pub fn planned_reads(&self, chunks: &[ChunkId], read: StoreRead<'_>) -> Vec<Planned> {
        let mut planned = Vec::new();
        for &id in chunks {
            for (i, v) in self.vars.iter().enumerate().filter(|(_, v)| v.coarse.is_none()) {
                match self.locate(i, v, id, read) {
                    None | Some(Located::Damaged { .. }) => {}
                    Some(Located::Whole(key)) => {
                        planned.push(Planned::Fetch(key, ByteRange::FromStart(0, None)));
                    }
                    Some(Located::InShard { key, index_range, index, chunk }) => {
                        // Readers decoding directly take the index from the same cache
                        // ([`Self::read_direct`]).
                        if !v.direct && !index.is_empty() {
                            planned.push(Planned::Give(key.clone(), index_range, index.clone()));
                        }
                        if let InShard::Stored(range) = chunk {
                            let held = self
                                .static_shard(v, &key, &index, read)
                                .and_then(|bytes| slice_of(&bytes, range));
                            planned.push(match held {
                                Some(bytes) => Planned::Give(key, range, bytes),
                                None => Planned::Fetch(key, range),
                            });
                        }
                    }
                }
            }
        }
        planned
    }

    /// The chunks of shard `key` of a static variable `v`, read whole once by the fetch threads and kept: a
    /// static variable's chunk is needed by every batch of its footprint (and again each epoch), yet holds a
    /// few hundred bytes, so reading it alone would cost a request per batch for almost nothing. `None` for
    /// time-varying variables, shards over [`STATIC_SHARD_BYTES`], once [`STATIC_SHARDS_BYTES`] are held, or
    /// when the read fails (the chunks are then fetched one by one).
    fn static_shard(
        &self,
        v: &Var,
        key: &StoreKey,
        index: &[u8],
        read: StoreRead<'_>,
    ) -> Option<zarrs::storage::Bytes> {
        if !v.meta.is_static {
            return None;
        }
        let end = decode::shard_data_end(index).filter(|&end| end <= STATIC_SHARD_BYTES)?;
        let once = self
            .static_shards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        once.get_or_init(|| {
            let held = self.static_shard_bytes.fetch_add(end, std::sync::atomic::Ordering::Relaxed);
            if held + end > STATIC_SHARDS_BYTES {
                self.static_shard_bytes.fetch_sub(end, std::sync::atomic::Ordering::Relaxed);
                return None;
            }
            let bytes = read(key, ByteRange::FromStart(0, Some(end)))
                .ok()
                .flatten()
                .filter(|bytes| bytes.len() as u64 == end);
            if bytes.is_none() {
                // Not held: the budget is given back.
                self.static_shard_bytes.fetch_sub(end, std::sync::atomic::Ordering::Relaxed);
            }
            bytes
        })
        .clone()
    }

    /// Where the stored bytes of chunk `id` of variable `i` (on the target grid) lie: its key when the
    /// array is not sharded; otherwise the shard's key, its index (read once per shard through `read`, and
    /// kept) and the chunk's place in the shard; [`Located::Damaged`] when that index is damaged. `None`
    /// when the chunk is not one stored (inner) chunk, or the shard's index cannot be read (zarrs then reads
    /// the chunk, and reports why).
    fn locate(&self, i: usize, v: &Var, id: ChunkId, read: StoreRead<'_>) -> Option<Located> {
        let subset = self.stored_layout(v).chunk_subset(v.meta.is_static, id);
        let (outer, inner) = v.stored_shapes.as_ref()?;
        let stored_at = || stored_index(&subset, outer);
        let stored = stored_at();
        let key = v.array.chunk_key(&stored);
        let Some(inner) = inner else {
            return subset
                .iter()
                .zip(outer)
                .all(|(r, &n)| r.end - r.start == n)
                .then_some(Located::Whole(key));
        };
        if subset.iter().zip(inner).any(|(r, &n)| r.end - r.start != n) {
            return None;
        }
        let index_range = v.index_read?;
        let once = self
            .shard_indexes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((i, stored))
            .or_default()
            .clone();
        let failed = std::cell::Cell::new(false);
        // A shard the store does not have is kept as an empty index: every chunk of it is absent.
        let index = once
            .get_or_init(|| match read(&key, index_range) {
                Ok(None) => Some(zarrs::storage::Bytes::new()),
                index => {
                    failed.set(index.is_err());
                    index.ok().flatten()
                }
            })
            .clone();
        if failed.get() {
            // The store failed, which it may not do again (an object store's hiccup): the shard's next chunk
            // reads its index anew. A missing or damaged index stays remembered (zarrs reads those chunks,
            // and reports why).
            let mut indexes = self.shard_indexes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let shard = (i, stored_at());
            if indexes.get(&shard).is_some_and(|kept| Arc::ptr_eq(kept, &once)) {
                indexes.remove(&shard);
            }
        }
        let index = index?;
        if index.is_empty() {
            return Some(Located::InShard { key, index_range, index, chunk: InShard::Empty });
        }
        // Whole (a store may answer a range with fewer bytes: a shard cut short) and matching its checksum.
        let length = match index_range {
            ByteRange::Suffix(length) | ByteRange::FromStart(_, Some(length)) => length,
            ByteRange::FromStart(_, None) => 0,
        };
        if index.len() as u64 != length {
            let why = format!("its shard index is cut short ({} bytes of {length})", index.len());
            return Some(Located::Damaged { key, why });
        }
        if !decode::index_is_intact(&index) {
            let why = format!("its shard index (its last {length} bytes) does not match its CRC32C checksum");
            return Some(Located::Damaged { key, why });
        }
        // Row-major position of the chunk in its shard.
        let mut position = 0u64;
        for ((r, n), o) in subset.iter().zip(inner).zip(outer) {
            let per_shard = o / n;
            position = position * per_shard + (r.start / n) % per_shard;
        }
        let chunk = decode::chunk_in_shard(&index, position)?;
        Some(Located::InShard { key, index_range, index, chunk })
    }

    /// Chunk `id` of variable `i` (in its own chunk grid: its level's for a variable on a level) decoded
    /// straight from its stored bytes ([`decode`]), its checksum checked, the shard index coming from the
    /// cache the fetch threads fill too; `Ok(None)` where that does not apply (another codec chain, an index
    /// that cannot be read), for zarrs to read it. With `progressive`, a float32 chunk is checked and left to
    /// be decoded by its user.
    fn read_direct(
        &self,
        i: usize,
        v: &Var,
        id: ChunkId,
        progressive: bool,
    ) -> Result<Option<Chunk>, LoaderError> {
        if !v.direct {
            return Ok(None);
        }
        let (key, range, encoded) = match self.stored_bytes(i, v, id)? {
            Stored::Unlocated => return Ok(None),
            Stored::Absent => return Ok(Some(Chunk::Decoded(Floats::nan(self.chunk_len(v))))),
            Stored::Bytes(key, range, bytes) => (key, range, bytes),
        };
        let dtype = v.meta.dtype;
        let failed = |e: String| LoaderError::Read {
            variable: v.meta.name.clone(),
            chunk: id,
            message: format!("{}: {}: {e}", self.path.display(), origin(&key, range)),
        };
        let decoding = Progressive::new(encoded, self.chunk_len(v) * dtype.size()).map_err(failed)?;
        if progressive && decoding.aligned_for::<f32>() {
            return Ok(Some(Chunk::Decoding(decoding)));
        }
        let bytes = decoding.finish().map_err(failed)?;
        Ok(Some(Chunk::Decoded(if dtype == DType::Float32 {
            Floats::from_le_bytes(bytes)
        } else {
            Floats::Values(le_ints_as_floats(&bytes, dtype, v.meta.fill_value))
        })))
    }

    /// A chunk that is not stored holds only missing values, which its entry in the validity index says
    /// too; where the index says some of its values are valid, its file (or its place in its shard) was
    /// lost, and delivering it as missing would hide that.
    fn check_absent(&self, v: &Var, [it, iy, ix]: ChunkId) -> Result<(), LoaderError> {
        let Some(index) = v.index.get() else { return Ok(()) };
        let [_, cy, cx] = self.meta.geometry(&v.meta).chunk_counts();
        let at = if v.meta.is_static { iy * cx + ix } else { (it * cy + iy) * cx + ix };
        match index.get(at) {
            Some(&fraction) if fraction > 0.0 => Err(LoaderError::Read {
                variable: v.meta.name.clone(),
                chunk: [it, iy, ix],
                message: format!(
                    "{}: the chunk is not stored, yet the cube's validity index says {:.1} % of its values \
                     are valid: its file was lost or damaged (`cubeload verify` lists what else is)",
                    self.path.display(),
                    100.0 * fraction
                ),
            }),
            _ => Ok(()),
        }
    }

    /// The stored bytes of chunk `id` of variable `i`; a chunk not stored is checked against the validity
    /// index ([`Assembler::check_absent`]).
    fn stored_bytes(&self, i: usize, v: &Var, id: ChunkId) -> Result<Stored, LoaderError> {
        let storage = v.array.storage();
        let read = |key: &StoreKey, range| storage.get_partial(key, range);
        let (key, range) = match self.locate(i, v, id, &read) {
            None => return Ok(Stored::Unlocated),
            Some(Located::Damaged { key, why }) => {
                return Err(LoaderError::Read {
                    variable: v.meta.name.clone(),
                    chunk: id,
                    message: format!("{}: {key}: {why}", self.path.display()),
                });
            }
            Some(Located::Whole(key)) => (key, ByteRange::FromStart(0, None)),
            Some(Located::InShard { chunk: InShard::Empty, .. }) => {
                return self.check_absent(v, id).map(|()| Stored::Absent);
            }
            Some(Located::InShard { key, chunk: InShard::Stored(range), .. }) => (key, range),
        };
        match self.read_stored_bytes(&*storage, &key, range) {
            Ok(Some(bytes)) => Ok(Stored::Bytes(key, range, bytes)),
            Ok(None) => self.check_absent(v, id).map(|()| Stored::Absent),
            Err(message) => Err(LoaderError::Read {
                variable: v.meta.name.clone(),
                chunk: id,
                message: format!("{}: {message}", self.path.display()),
            }),
        }
    }

    /// What [`Assembler::read_direct`] checks of a chunk that zarrs is left to decode (another codec chain:
    /// gzip, no compression): its CRC32C, which zarrs does not check when it reads part of a shard, and,
    /// when it is not stored, the validity index. Its bytes are read twice, once here.
    fn check_stored(&self, i: usize, v: &Var, id: ChunkId) -> Result<(), LoaderError> {
        let Stored::Bytes(key, range, bytes) = self.stored_bytes(i, v, id)? else { return Ok(()) };
        let intact = || {
            bytes
                .split_last_chunk::<4>()
                .is_some_and(|(body, sum)| crc32c::crc32c(body) == u32::from_le_bytes(*sum))
        };
        if v.checksummed && !intact() {
            return Err(LoaderError::Read {
                variable: v.meta.name.clone(),
                chunk: id,
                message: format!(
                    "{}: {}: cannot be decoded: CRC32C checksum mismatch",
                    self.path.display(),
                    origin(&key, range)
                ),
            });
        }
        Ok(())
    }

    /// Values in a stored chunk of `v` (on the target grid, or on its level).
    fn chunk_len(&self, v: &Var) -> usize {
        let subset = self.stored_layout(v).chunk_subset(v.meta.is_static, [0, 0, 0]);
        subset.iter().map(|r| (r.end - r.start) as usize).product()
    }

    /// How `v` is chunked as stored: the cube's layout, or its level's.
    fn stored_layout<'a>(&'a self, v: &'a Var) -> &'a Layout {
        v.coarse.as_ref().map_or(&self.meta.layout, |c| &c.level.layout)
    }

    /// Reads and decodes chunk `id` of variable `var` in its own chunking (its level's, for a variable on a
    /// level), as the loader reads it, assembling nothing; returns the number of bytes decoded. What
    /// `cubeload bench` calls the ceiling does this for every chunk of its batches.
    ///
    /// # Errors
    /// [`LoaderError::Read`] naming the variable and chunk.
    pub fn decode_stored(&self, var: usize, id: ChunkId) -> Result<usize, LoaderError> {
        self.decode_stored_then(var, id, |_| {})
    }

    /// [`Assembler::decode_stored`], then `then` given the values decoded (still in the core's cache): what
    /// `cubeload bench` streams its batches' bytes from in the ceiling with writes.
    ///
    /// # Errors
    /// As [`Assembler::decode_stored`].
    pub(crate) fn decode_stored_then(
        &self,
        var: usize,
        id: ChunkId,
        then: impl FnOnce(&[f32]),
    ) -> Result<usize, LoaderError> {
        let v = &self.vars[var];
        let floats = self.read_stored(v, id)?;
        then(&floats);
        Ok(floats.len() * size_of::<f32>())
    }

    /// One chunk of `v` on the target cells of chunk `id`: read as stored, or regridded from its level
    /// (or, delivered natively, the level cells under the chunk).
    fn read_variable(&self, v: &Var, id: ChunkId) -> Result<Floats, LoaderError> {
        let Some(coarse) = &v.coarse else { return self.read_stored(v, id) };
        let (rows, cols) = self.footprint(id);
        let [ky, kx] = coarse.level.factor;
        let (n_rows, n_cols) = (coarse.level.grid.height, coarse.level.grid.width);
        let native = self.is_native(v);
        let upsampling = if native { Upsampling::Nearest } else { coarse.upsampling };
        let window = self.level_window(
            v,
            coarse,
            id[0],
            level_span(upsampling, &rows, ky, n_rows),
            level_span(upsampling, &cols, kx, n_cols),
        )?;
        if native {
            return Ok(window.values.into());
        }
        let [_, height, width] = self.meta.shape;
        let plane = upsample(&window, &coarse.level, upsampling, rows, cols, (height, width));
        let q = coarse.level.time_factor;
        if q == 1 || v.meta.is_static {
            return Ok(plane.into());
        }
        // Every target step of a level step's window takes its value; steps past the axis are padding.
        let cells = plane.len() / window.steps;
        let mut values: Vec<f32> = Vec::with_capacity(plane.len() * q);
        for step in plane.chunks_exact(cells) {
            for _ in 0..q {
                values.extend_from_slice(step);
            }
        }
        let valid_steps = self.meta.shape[0].saturating_sub(id[0] * self.meta.layout.chunk_t);
        if let Some(padding) = values.get_mut(valid_steps * cells..) {
            padding.fill(f32::NAN);
        }
        Ok(values.into())
    }

    /// Target rows and columns of chunk `id`.
    fn footprint(&self, [_, iy, ix]: ChunkId) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let l = &self.meta.layout;
        (iy * l.chunk_y..(iy + 1) * l.chunk_y, ix * l.chunk_x..(ix + 1) * l.chunk_x)
    }

    /// Level cells `rows × cols` of time chunk `it`, assembled from the (cached) level chunks holding them.
    fn level_window(
        &self,
        v: &Var,
        coarse: &Coarse,
        it: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) -> Result<Window, LoaderError> {
        let layout = &coarse.level.layout;
        let (chunk_y, chunk_x) = (layout.chunk_y, layout.chunk_x);
        let steps = if v.meta.is_static { 1 } else { layout.chunk_t };
        let (height, width) = (rows.len(), cols.len());
        let mut values = vec![f32::NAN; steps * height * width];
        for iy in rows.start / chunk_y..=(rows.end - 1) / chunk_y {
            for ix in cols.start / chunk_x..=(cols.end - 1) / chunk_x {
                // A static variable has one chunk whatever the time chunk.
                let id = [if v.meta.is_static { 0 } else { it }, iy, ix];
                let chunk = coarse.cache.get_or_read(id, || self.read_stored(v, id).map(Floats::into_vec))?;
                let (row0, col0) = (iy * chunk_y, ix * chunk_x);
                let (first, last) = (cols.start.max(col0), cols.end.min(col0 + chunk_x));
                for step in 0..steps {
                    for row in rows.start.max(row0)..rows.end.min(row0 + chunk_y) {
                        let from = (step * chunk_y + row - row0) * chunk_x;
                        let to = (step * height + row - rows.start) * width;
                        values[to + first - cols.start..to + last - cols.start]
                            .copy_from_slice(&chunk[from + first - col0..from + last - col0]);
                    }
                }
            }
        }
        Ok(Window { rows, cols, steps, values })
    }

    /// The stored object (the chunk, or the shard holding it) of chunk `id` of `v`, for messages.
    fn stored_key(&self, v: &Var, id: ChunkId) -> Option<StoreKey> {
        let subset = self.stored_layout(v).chunk_subset(v.meta.is_static, id);
        let (outer, _) = v.stored_shapes.as_ref()?;
        Some(v.array.chunk_key(&stored_index(&subset, outer)))
    }

    /// Chunk `id` of `v` as stored (in its level's chunk grid for a variable on a level): decoded by the
    /// loader where it can ([`Assembler::read_direct`]), else by zarrs.
    fn read_stored(&self, v: &Var, id: ChunkId) -> Result<Floats, LoaderError> {
        let i = self.vars.iter().position(|w| std::ptr::eq(w, v)).expect("a variable of this assembler");
        if let Some(Chunk::Decoded(floats)) = self.read_direct(i, v, id, false)? {
            return Ok(floats);
        }
        if !v.direct {
            self.check_stored(i, v, id)?;
        }
        let subset = self.stored_layout(v).chunk_subset(v.meta.is_static, id);
        // zarrs' errors name no file ("failed to fill whole buffer"): the object read is named here.
        let object = self.stored_key(v, id).map(|k| format!("{k}: ")).unwrap_or_default();
        let fail = |e: &dyn std::fmt::Display| LoaderError::Read {
            variable: v.meta.name.clone(),
            chunk: id,
            message: format!("{}: {object}{e}", self.path.display()),
        };
        // Chunks fetched ahead come with their shard's index: zarrs' index cache is not needed (and would
        // read a missing index under its lock).
        let cache = (!self.fetched || v.coarse.is_some()).then_some(&v.shards);
        if v.meta.dtype == DType::Float32 {
            // As the decoded bytes: asking zarrs for a `Vec<f32>` copies them into a new vector.
            let bytes = match cache {
                Some(cache) => v.array.retrieve_array_subset_sharded_opt::<ArrayBytes<'static>>(
                    cache,
                    &subset.clone(),
                    &one_thread(),
                ),
                None => {
                    v.array.retrieve_array_subset_opt::<ArrayBytes<'static>>(&subset.clone(), &one_thread())
                }
            };
            let bytes = bytes.and_then(|b| Ok(b.into_fixed()?.into_owned())).map_err(|e| fail(&e))?;
            return Ok(Floats::from_le_bytes(bytes));
        }
        let fill = v.meta.fill_value;
        let values =
            read_f64_cached(&v.array, cache, v.meta.dtype, &subset, &one_thread()).map_err(|e| fail(&e))?;
        Ok(values.into_iter().map(|x| stored_as_float(x, fill)).collect::<Vec<f32>>().into())
    }

    /// Reads and assembles the batches of one job; with several chunks, samples are mixed across them.
    /// With `skip_corrupt`, a chunk that cannot be read or decoded is left out; the count of those comes
    /// back with the batches.
    ///
    /// # Errors
    /// [`LoaderError::Read`] naming the variable and chunk when a chunk cannot be read or decoded.
    pub fn job(&self, seed: u64, job: &Job, skip_corrupt: bool) -> Result<(Vec<Batch>, usize), LoaderError> {
        // A chunk that cannot be read because the cube was deleted meanwhile, or because its store does not
        // answer, is no corrupt chunk to skip.
        let presence = || self.gone.as_ref().map_or(Presence::There, |gone| gone.check());
        let blame = |failed: String| match presence() {
            Presence::There => None,
            Presence::Gone => Some(LoaderError::CubeDeleted { path: self.path.clone() }),
            Presence::Unreachable => {
                Some(LoaderError::StoreUnreachable { path: self.path.clone(), message: failed })
            }
        };
        let (mut batches, corrupt) = match self.job_batches(seed, job, skip_corrupt) {
            Ok((batches, corrupt)) => {
                if corrupt > 0
                    && let Some(error) = blame(format!("{corrupt} of its chunks could not be read"))
                {
                    return Err(error);
                }
                (batches, corrupt)
            }
            Err(error @ LoaderError::Read { .. }) => return Err(blame(error.to_string()).unwrap_or(error)),
            Err(error) => return Err(error),
        };
        for batch in &mut batches {
            self.mask_static_padding(batch);
        }
        Ok((batches, corrupt))
    }

    /// Static variables repeated along time hold their value on every step of a sample, the steps past the
    /// time axis too (a last window or sequence longer than what is left of the axis): there they are made
    /// missing, as the time-varying variables are. Only batches with samples past the axis are touched.
    fn mask_static_padding(&self, batch: &mut Batch) {
        let (n_time, t_len) = (self.meta.shape[0], self.meta.layout.chunk_t);
        // A cube of static variables alone has no time axis: its batches' one step is no padding.
        if n_time == 0 || batch.time_index.iter().all(|&t0| t0 + t_len <= n_time) {
            return;
        }
        let is_static = |name: &String| self.vars.iter().any(|v| v.meta.is_static && v.meta.name == *name);
        let slots: Vec<usize> =
            batch.variables.iter().enumerate().filter(|(_, name)| is_static(name)).map(|(i, _)| i).collect();
        let l = &self.meta.layout;
        let cells = if l.kind == LayoutKind::ImageSequence { l.patch[0] * l.patch[1] } else { 1 };
        let (samples, nv) = (batch.time_index.len(), batch.variables.len());
        for (p, &t0) in batch.time_index.iter().enumerate() {
            for t in n_time.saturating_sub(t0).min(t_len)..t_len {
                for &vi in &slots {
                    let at = if batch.variable_major {
                        ((vi * samples + p) * t_len + t) * cells
                    } else {
                        ((p * t_len + t) * nv + vi) * cells
                    };
                    batch.data[at..at + cells].fill(self.transform.fill);
                    batch.mask[at..at + cells].fill(0);
                }
            }
        }
    }

    /// [`Assembler::job`]'s batches as assembled.
    fn job_batches(
        &self,
        seed: u64,
        job: &Job,
        skip_corrupt: bool,
    ) -> Result<(Vec<Batch>, usize), LoaderError> {
        let Job { epoch, position: first_position, ref chunks, .. } = *job;
        let mixing = |total| mixing_order(total, &mut rng_for(seed, 1, job.mixing));
        if chunks.len() > 1 && self.mixes_in_place() {
            match self.assemble_mixed(
                chunks,
                (epoch, first_position),
                &mixing(chunks.len() * self.batch_shape().0),
            ) {
                Ok(batches) => return Ok((batches, 0)),
                // The group is made again below, chunk by chunk, without the chunk that cannot be read.
                Err(LoaderError::Read { .. }) if skip_corrupt => {}
                Err(e) => return Err(e),
            }
        }
        let mut batches = Vec::with_capacity(chunks.len());
        let mut corrupt = 0;
        for (k, &id) in chunks.iter().enumerate() {
            let raw = match self.read_chunk(id) {
                Ok(raw) => raw,
                Err(LoaderError::Read { .. }) if skip_corrupt => {
                    corrupt += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match self.assemble(id, BatchOrigin { epoch, position: first_position + k, chunk: id }, raw) {
                Ok(batch) => batches.push(batch),
                Err(LoaderError::Read { .. }) if skip_corrupt => corrupt += 1,
                Err(e) => return Err(e),
            }
        }
        if batches.len() > 1 {
            let order = mixing(batches.iter().map(Batch::len).sum());
            mix(&mut batches, &order);
        }
        Ok((batches, corrupt))
    }

    /// Whether the samples of a group of chunks are written straight to their places in the mixed batches
    /// ([`Assembler::assemble_mixed`]): image sequences, and pixel series stored time-major (tiled), every
    /// variable delivered on the target grid. Groups of cubes stored `order: shuffled` are made batch by
    /// batch, then mixed ([`mix`]).
    fn mixes_in_place(&self) -> bool {
        let l = &self.meta.layout;
        (l.kind == LayoutKind::ImageSequence || l.shuffled.is_none())
            && !self.vars.iter().any(|v| self.is_native(v))
    }

    /// The batches of the group of chunks `chunks`, their samples mixed across them by `order`, as [`mix`]
    /// mixes the batches made one by one: sample `s` of batch `j` is source `order[j · B + s]`, sample
    /// `% B` of chunk `/ B`. Each chunk's samples are written straight to their places in the group's
    /// batches, so that mixing writes nothing more than assembling: pixel series transposed there, the
    /// group's mask made as bits in the core's cache and each batch's streamed as bytes once every chunk is
    /// done; image sequences a patch row at a time, with their mask bytes.
    ///
    /// # Errors
    /// [`LoaderError::Read`] naming the variable and chunk when a chunk cannot be read or decoded.
    fn assemble_mixed(
        &self,
        chunks: &[ChunkId],
        (epoch, first_position): (usize, usize),
        order: &[usize],
    ) -> Result<Vec<Batch>, LoaderError> {
        let l = &self.meta.layout;
        let t_len = l.chunk_t;
        let (names, static_names) = self.variable_names();
        let (nv, ns) = (names.len(), static_names.len());
        let separate = self.transform.separate_statics;
        let (b, shape, sample_cells) = self.batch_shape();
        let (k, cells) = (chunks.len(), b * sample_cells);
        let images = l.kind == LayoutKind::ImageSequence;
        let statics_cells = if images { ns * l.patch[0] * l.patch[1] } else { ns };
        // Each batch's bits from a word of its own, turned into bytes on their own.
        let batch_bits = cells.div_ceil(64) * 64;
        // The slot in the group (batch `/ B`, sample `% B`) of each source sample (chunk `/ B`, sample `% B`).
        let mut place = vec![0; k * b];
        for (slot, &source) in order.iter().enumerate() {
            place[source] = slot;
        }
        // Where a sample's values begin in its batch: its row (`[B, T, V]`), or its row of the first
        // variable (`[V, B, T]`).
        let row = if self.transform.variable_major { t_len } else { sample_cells };
        let fill = self.transform.fill;
        // Not zeroed: every sample of every batch receives one source sample, every column of it.
        let mut data: Vec<Vec<f32>> = (0..k).map(|_| buffers::take(cells)).collect();
        let mut masks: Vec<Vec<u8>> = (0..k).map(|_| buffers::take(cells)).collect();
        let mut bits = vec![0u64; if images { 0 } else { k * batch_bits / 64 }];
        let mut statics = vec![vec![0.0f32; if separate { b * statics_cells } else { 0 }]; k];
        let mut statics_mask = vec![vec![0u8; if separate { b * statics_cells } else { 0 }]; k];
        let (mut lat, mut lon) = (vec![vec![0.0; b]; k], vec![vec![0.0; b]; k]);
        let mut time_index = vec![vec![0; b]; k];
        let mut outs: Vec<&mut [MaybeUninit<f32>]> =
            data.iter_mut().map(|d| &mut d.spare_capacity_mut()[..cells]).collect();
        let mut mask_outs: Vec<&mut [MaybeUninit<u8>]> =
            masks.iter_mut().map(|m| &mut m.spare_capacity_mut()[..cells]).collect();
        for (c, &id) in chunks.iter().enumerate() {
            let places: Vec<(usize, usize)> =
                place[c * b..(c + 1) * b].iter().map(|&q| (q / b, q % b)).collect();
            let (raw, mut decoders) = split_decoders(self.read_chunk(id)?);
            let (mut vi, mut si) = (0, 0);
            let mut series = Vec::new();
            for ((v, chunk), decoder) in self.vars.iter().zip(&raw).zip(decoder_indices(&raw)) {
                let chunk: &[f32] = chunk.as_deref().unwrap_or_default();
                let into_statics = separate && v.meta.is_static;
                if images {
                    // Patch by patch, each to its place (mask bytes written with the values).
                    let slot = if into_statics { si } else { vi };
                    for (g, &(j, s)) in places.iter().enumerate() {
                        let apart = (&mut statics[j][..], &mut statics_mask[j][..]);
                        let parts = (&mut *outs[j], &mut *mask_outs[j], apart);
                        self.image_sample((v, slot, into_statics), chunk, (g, s), (b, nv, ns), parts);
                    }
                } else if into_statics {
                    for (g, &(j, s)) in places.iter().enumerate() {
                        (statics[j][s * ns + si], statics_mask[j][s * ns + si]) =
                            prepare(chunk[g], v.affine.0, v.affine.1, fill);
                    }
                } else {
                    series.push(self.series_copy((v, vi), chunk, decoder, (b, nv)));
                }
                if into_statics {
                    si += 1;
                } else {
                    vi += 1;
                }
            }
            for (g, &(j, s)) in places.iter().enumerate() {
                (lat[j][s], lon[j][s]) = self.position(id, g);
                time_index[j][s] = id[0] * t_len;
            }
            if images {
                continue;
            }
            let starts: Vec<(usize, usize)> = places.iter().map(|&(j, s)| (j, s * row)).collect();
            let mask_at = places.iter().map(|&(j, s)| j * batch_bits + s * row).collect();
            let dest = Dest::scattered(&mut outs, &starts, cells - (b - 1) * row, mask_at);
            transpose_blocks(&series, &mut decoders, (b, t_len), fill, &dest, Mask::Bits(&mut bits))
                .map_err(|(d, message)| self.decoding_failed(id, &raw, d, &message))?;
        }
        if !images {
            for (j, mask) in mask_outs.iter_mut().enumerate() {
                bits_to_mask(&bits[j * batch_bits / 64..(j + 1) * batch_bits / 64], mask);
            }
        }
        // Streamed values and mask bytes: visible to the threads the batches go to only after this fence.
        fence();
        let statics = statics.into_iter().zip(statics_mask);
        let parts = data.into_iter().zip(masks).zip(statics).zip(lat.into_iter().zip(lon)).zip(time_index);
        Ok(parts
            .enumerate()
            .map(|(j, ((((mut data, mut mask), (statics, statics_mask)), (lat, lon)), time_index))| {
                // SAFETY: every element of both was written: each sample of each batch received one source
                // sample (`order` is a permutation), whose variables cover every column of its values, or
                // every row of its patches, with their mask bytes (as in `assemble`); the mask bytes of
                // pixel series were then written by `bits_to_mask`.
                unsafe {
                    data.set_len(cells);
                    mask.set_len(cells);
                }
                Batch {
                    origin: BatchOrigin { epoch, position: first_position + j, chunk: chunks[j] },
                    kind: l.kind,
                    variable_major: self.transform.variable_major,
                    variables: names.clone(),
                    shape: shape.clone(),
                    data,
                    mask,
                    static_variables: static_names.clone(),
                    statics,
                    statics_mask,
                    lat,
                    lon,
                    time_index,
                    native: Vec::new(),
                }
            })
            .collect())
    }

    /// The samples of a batch, the shape of its values and the values per sample.
    fn batch_shape(&self) -> (usize, Vec<usize>, usize) {
        let l = &self.meta.layout;
        let (t_len, cy, cx) = (l.chunk_t, l.chunk_y, l.chunk_x);
        let nv = self.variable_names().0.len();
        let vmajor = self.transform.variable_major;
        match l.kind {
            LayoutKind::PixelSeries => {
                let b = if l.shuffled.is_some() { cy } else { cy * cx };
                (b, if vmajor { vec![nv, b, t_len] } else { vec![b, t_len, nv] }, t_len * nv)
            }
            LayoutKind::ImageSequence => {
                let [ph, pw] = l.patch;
                let b = (cy / ph) * (cx / pw);
                let shape = if vmajor { vec![nv, b, t_len, ph, pw] } else { vec![b, t_len, nv, ph, pw] };
                (b, shape, t_len * nv * ph * pw)
            }
        }
    }

    /// The bytes of a batch's values and mask (what prefetching holds per batch).
    pub(crate) fn batch_bytes(&self) -> usize {
        let (b, _, sample_cells) = self.batch_shape();
        b * sample_cells * (size_of::<f32>() + size_of::<u8>())
    }

    /// Where sample `s` of the batch of chunk `id` is: its pixel, or its patch's centre.
    fn position(&self, id: ChunkId, s: usize) -> (f64, f64) {
        let l = &self.meta.layout;
        let [_, iy, ix] = id;
        let (cy, cx) = (l.chunk_y, l.chunk_x);
        match l.kind {
            LayoutKind::PixelSeries if l.shuffled.is_some() => (self.lat[iy * cy + s], self.lon[iy * cy + s]),
            LayoutKind::PixelSeries => (self.lat[iy * cy + s / cx], self.lon[ix * cx + s % cx]),
            LayoutKind::ImageSequence => {
                let [ph, pw] = l.patch;
                let gx = cx / pw;
                let (y0, x0) = (iy * cy + s / gx * ph, ix * cx + s % gx * pw);
                // Patch centre: mean of the two middle cells for even sizes.
                let lat = f64::midpoint(self.lat[y0 + (ph - 1) / 2], self.lat[y0 + ph / 2]);
                let lon = f64::midpoint(self.lon[x0 + (pw - 1) / 2], self.lon[x0 + pw / 2]);
                (lat, lon)
            }
        }
    }

    /// Sample `sample` of variable `v`'s chunk `chunk` in an image-sequence batch of `b` samples, written as
    /// sample `place` of a batch's values `out` and `mask` (`v` the `slot`-th of its `nv` values), or of its
    /// `statics` and their mask (`v` the `slot`-th of its `ns`), row by row: a patch row is `pw` values side by
    /// side in the chunk and in the batch.
    fn image_sample(
        &self,
        (v, slot, into_statics): (&Var, usize, bool),
        chunk: &[f32],
        (sample, place): (usize, usize),
        (b, nv, ns): (usize, usize, usize),
        (out, mask, (statics, statics_mask)): SampleOut<'_>,
    ) {
        let l = &self.meta.layout;
        let (t_len, cy, cx) = (l.chunk_t, l.chunk_y, l.chunk_x);
        let [ph, pw] = l.patch;
        let gx = cx / pw;
        let (sy, sx) = (sample / gx * ph, sample % gx * pw);
        let fill = self.transform.fill;
        if into_statics {
            for py in 0..ph {
                let (from, to) = ((sy + py) * cx + sx, ((place * ns + slot) * ph + py) * pw);
                let outs = statics[to..to + pw].iter_mut().zip(&mut statics_mask[to..to + pw]);
                for ((o, m), x) in outs.zip(&chunk[from..from + pw]) {
                    (*o, *m) = prepare(*x, v.affine.0, v.affine.1, fill);
                }
            }
            return;
        }
        let step = if v.meta.is_static { 0 } else { cy * cx };
        for t in 0..t_len {
            let plane = if self.transform.variable_major {
                (slot * b + place) * t_len + t
            } else {
                (place * t_len + t) * nv + slot
            };
            let (from, to) = (t * step + sy * cx + sx, plane * ph * pw);
            prepare_block(&chunk[from..], cx, (ph, pw), v.affine, fill, &mut out[to..], &mut mask[to..]);
        }
    }

    /// How variable `v` (the `vi`-th of the `nv` in the values of a batch of `b` samples), whose chunk is
    /// `chunk` or is left to decoder `decoder`, is copied into a pixel-series batch: where value (p, t) of the
    /// chunk is, and where it goes.
    fn series_copy<'c>(
        &self,
        (v, vi): (&Var, usize),
        chunk: &'c [f32],
        decoder: Option<usize>,
        (b, nv): (usize, usize),
    ) -> SeriesCopy<'c> {
        let l = &self.meta.layout;
        let t_len = l.chunk_t;
        let read = match (v.meta.is_static, l.shuffled.is_some()) {
            (true, _) => (1, 0),
            (false, true) => (t_len, 1),
            (false, false) => (1, b),
        };
        let (write_p, write_t, base) =
            if self.transform.variable_major { (t_len, 1, vi * b * t_len) } else { (t_len * nv, nv, vi) };
        SeriesCopy { chunk, decoder, read, out: Strided { base, write_p, write_t }, affine: v.affine }
    }

    /// The error of decoder `k` of the chunks `raw` of batch `id`: that of the k-th variable whose chunk was
    /// left to decode.
    fn decoding_failed(&self, id: ChunkId, raw: &[Option<Floats>], k: usize, message: &str) -> LoaderError {
        let (i, (v, _)) = self
            .vars
            .iter()
            .zip(raw)
            .enumerate()
            .filter(|(_, (_, c))| c.is_none())
            .nth(k)
            .expect("a decoder");
        // Where its bytes lie, found again for the message (the readers' path keeps no name of them).
        let storage = v.array.storage();
        let read = |key: &StoreKey, range| storage.get_partial(key, range);
        let place = match self.locate(i, v, id, &read) {
            Some(Located::InShard { key, chunk: InShard::Stored(range), .. }) => origin(&key, range) + ": ",
            Some(Located::Whole(key)) => format!("{key}: "),
            Some(Located::Damaged { key, why }) => format!("{key}: {why}: "),
            _ => String::new(),
        };
        LoaderError::Read {
            variable: v.meta.name.clone(),
            chunk: id,
            message: format!("{}: {place}{message}", self.path.display()),
        }
    }

    /// The batch of chunk `id` from its chunks as read ([`Assembler::read_chunk`]).
    ///
    /// # Errors
    /// [`LoaderError::Read`] when a chunk decoded here cannot be decoded.
    fn assemble(&self, id: ChunkId, origin: BatchOrigin, raw: Vec<Chunk>) -> Result<Batch, LoaderError> {
        let l = &self.meta.layout;
        let [it, _, _] = id;
        let t_len = l.chunk_t;
        let separate = self.transform.separate_statics;
        let (names, static_names) = self.variable_names();
        let nv = names.len();
        let ns = static_names.len();
        let vmajor = self.transform.variable_major;
        let (b, shape, sample_cells) = self.batch_shape();
        // Neither zeroed: every element of both is written below (each variable on the target grid covers its
        // column of every sample and step, or its rows of every patch) before the lengths are set. Both are
        // buffers given back by earlier batches' consumers where there are some ([`buffers`]).
        let cells = b * sample_cells;
        let mut data: Vec<f32> = buffers::take(cells);
        let out = &mut data.spare_capacity_mut()[..cells];
        let mut mask: Vec<u8> = buffers::take(cells);
        let mask_out = &mut mask.spare_capacity_mut()[..cells];
        let statics_cells = match l.kind {
            LayoutKind::PixelSeries => ns,
            LayoutKind::ImageSequence => ns * l.patch[0] * l.patch[1],
        };
        let mut statics = vec![0.0f32; if separate { b * statics_cells } else { 0 }];
        let mut statics_mask = vec![0u8; statics.len()];
        let fill = self.transform.fill;
        let prepare = |v: &Var, x: f32| prepare(x, v.affine.0, v.affine.1, fill);
        let (mut vi, mut si) = (0, 0);
        let mut native = Vec::new();
        let mut series = Vec::new();
        let (raw, mut decoders) = split_decoders(raw);
        for ((v, chunk), decoder) in self.vars.iter().zip(&raw).zip(decoder_indices(&raw)) {
            let chunk: &[f32] = chunk.as_deref().unwrap_or_default();
            let into_series =
                l.kind == LayoutKind::PixelSeries && !self.is_native(v) && !(separate && v.meta.is_static);
            assert!(
                decoder.is_none() || into_series,
                "only chunks copied as series are decoded as they are copied"
            );
            if self.is_native(v) {
                native.push(self.native_field(v, id, chunk, &prepare));
                continue;
            }
            let into_statics = separate && v.meta.is_static;
            match l.kind {
                LayoutKind::PixelSeries if into_statics => {
                    for p in 0..b {
                        (statics[p * ns + si], statics_mask[p * ns + si]) = prepare(v, chunk[p]);
                    }
                }
                LayoutKind::PixelSeries => series.push(self.series_copy((v, vi), chunk, decoder, (b, nv))),
                LayoutKind::ImageSequence => {
                    let slot = if into_statics { si } else { vi };
                    for s in 0..b {
                        let parts = (&mut *out, &mut *mask_out, (&mut statics[..], &mut statics_mask[..]));
                        self.image_sample((v, slot, into_statics), chunk, (s, s), (b, nv, ns), parts);
                    }
                }
            }
            if into_statics {
                si += 1;
            } else {
                vi += 1;
            }
        }
        copy_series(&series, &mut decoders, (b, t_len), fill, out, mask_out)
            .map_err(|(k, message)| self.decoding_failed(id, &raw, k, &message))?;
        // Image-sequence blocks are written with non-temporal stores: visible to the thread the batch goes to
        // only after a fence.
        fence();
        // SAFETY: the first `cells` elements of both are initialized: the variables in `data` are those of
        // `names` (not native, not separate statics), each pushed one series copy writing its column of every
        // sample and step, or wrote its rows of every patch of every step (image sequences), and these cover
        // the batch (the loader's tests compare every element and mask byte with the cube).
        unsafe {
            data.set_len(cells);
            mask.set_len(cells);
        }
        let (lat, lon): (Vec<f64>, Vec<f64>) = (0..b).map(|s| self.position(id, s)).unzip();
        Ok(Batch {
            origin,
            kind: l.kind,
            variable_major: vmajor,
            variables: names,
            shape,
            data,
            mask,
            static_variables: static_names,
            statics,
            statics_mask,
            lat,
            lon,
            time_index: vec![it * t_len; b],
            native,
        })
    }

    /// The level cells under chunk `id` of a variable delivered at its native resolution.
    fn native_field(
        &self,
        v: &Var,
        id: ChunkId,
        window: &[f32],
        prepare: &dyn Fn(&Var, f32) -> (f32, u8),
    ) -> NativeField {
        let coarse = v.coarse.as_ref().expect("native variables are on a level");
        let (rows, cols) = self.footprint(id);
        let [ky, kx] = coarse.level.factor;
        let rows = level_span(Upsampling::Nearest, &rows, ky, coarse.level.grid.height);
        let cols = level_span(Upsampling::Nearest, &cols, kx, coarse.level.grid.width);
        let mut shape = vec![rows.len(), cols.len()];
        if !v.meta.is_static {
            shape.insert(0, coarse.level.layout.chunk_t);
        }
        let (data, mask) = window.iter().map(|&x| prepare(v, x)).unzip();
        NativeField {
            name: v.meta.name.clone(),
            factor: coarse.level.factor,
            origin: [rows.start, cols.start],
            shape,
            data,
            mask,
        }
    }
}

/// A chunk's place in the store, for error messages: its key, and its bytes there when they are a range.
/// The index in its array's chunk grid of the stored object (the chunk, or the shard holding it) of the
/// chunk covering `subset`, whose objects are `outer` cells wide.
fn stored_index(subset: &[std::ops::Range<u64>], outer: &[u64]) -> Vec<u64> {
    subset.iter().zip(outer).map(|(r, n)| r.start / n).collect()
}

fn origin(key: &StoreKey, range: ByteRange) -> String {
    match range {
        ByteRange::FromStart(offset, Some(length)) => {
            format!("{key} bytes {offset}..{}", offset.saturating_add(length))
        }
        _ => key.to_string(),
    }
}

/// Bytes of a read past which [`Assembler::read_stored_bytes`] checks that the file holds them.
const LARGE_READ: u64 = 256 << 20;

/// `length` bytes of `file` from `offset`, read into a buffer that is not zeroed first (the reads are the
/// encoded chunks, hundreds of KB each).
#[cfg(unix)]
fn read_exact_at(file: &std::fs::File, offset: u64, length: u64) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let invalid = |what| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
    let length = usize::try_from(length).map_err(|_| invalid("length"))?;
    let mut bytes: Vec<u8> = Vec::with_capacity(length);
    let mut done = 0;
    while done < length {
        let at =
            offset.checked_add(done as u64).and_then(|at| i64::try_from(at).ok()).ok_or(invalid("offset"))?;
        // SAFETY: the kernel writes at most `length - done` bytes after the first `done` of the buffer,
        // within its capacity.
        let n =
            unsafe { libc::pread(file.as_raw_fd(), bytes.as_mut_ptr().add(done).cast(), length - done, at) };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => done += n.cast_unsigned(),
        }
    }
    // SAFETY: the first `length` bytes were written by the reads above.
    unsafe { bytes.set_len(length) };
    Ok(bytes)
}

/// `posix_fadvise(WILLNEED)` over `length` bytes (0: to the end) from `offset` of `file`.
#[cfg(target_os = "linux")]
fn will_need(file: &std::fs::File, offset: u64, length: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(length)) = (i64::try_from(offset), i64::try_from(length)) else { return };
    // SAFETY: a valid open descriptor; the call only reads its arguments.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, length, libc::POSIX_FADV_WILLNEED) };
}

#[cfg(not(target_os = "linux"))]
fn will_need(_: &std::fs::File, _: u64, _: u64) {}

/// Opens an array and holds it to the cube's metadata before anything is read or sized from it.
fn checked_array(
    cube: &Cube,
    role: ArrayRole<'_>,
    name: &str,
) -> Result<Array<dyn ReadableStorageTraits>, LoaderError> {
    let array = cube.array(name)?;
    check_array(cube.meta(), role, &array).map_err(|e| CubeError::NotACube {
        path: cube.path().to_path_buf(),
        message: format!("array {e}"),
    })?;
    Ok(array)
}

/// A chunk as read for a batch: decoded, or (a time-major float32 chunk of a pixel-series batch) checked
/// and left to be decoded a block at a time as the batch is assembled ([`copy_series`]).
enum Chunk {
    Decoded(Floats),
    Decoding(Progressive),
}

/// A decoded chunk of float32 values. Decoded bytes are viewed as `f32` where they lie (allocations are
/// aligned for `f32` in practice), which saves copying every chunk into a new vector.
pub(crate) enum Floats {
    /// Little-endian float32 bytes, aligned for `f32` and a whole number of values (checked when made).
    Bytes(Vec<u8>),
    /// Values.
    Values(Vec<f32>),
}

impl Floats {
    /// The values of little-endian float32 `bytes` (copied only when they are not aligned for `f32` or the
    /// machine is big-endian).
    fn from_le_bytes(bytes: Vec<u8>) -> Self {
        if cfg!(target_endian = "little") && bytemuck::try_cast_slice::<u8, f32>(&bytes).is_ok() {
            return Floats::Bytes(bytes);
        }
        Floats::Values(le_floats(&bytes))
    }

    /// A chunk of `len` missing values.
    fn nan(len: usize) -> Self {
        Floats::Values(vec![f32::NAN; len])
    }

    fn into_vec(self) -> Vec<f32> {
        match self {
            Floats::Bytes(_) => self.to_vec(),
            Floats::Values(values) => values,
        }
    }
}

/// A stored integer as a float32 value, NaN for the variable's fill value (a missing value).
fn stored_as_float(x: f64, fill: Option<f64>) -> f32 {
    if Some(x) == fill { f32::NAN } else { x as f32 }
}

/// Little-endian integers of type `dtype` as float32 values, NaN for the fill value.
fn le_ints_as_floats(bytes: &[u8], dtype: DType, fill: Option<f64>) -> Vec<f32> {
    fn each<const N: usize>(bytes: &[u8], value: impl Fn([u8; N]) -> f64, fill: Option<f64>) -> Vec<f32> {
        bytes.chunks_exact(N).map(|b| stored_as_float(value(b.try_into().expect("N bytes")), fill)).collect()
    }
    match dtype {
        DType::Uint8 => each(bytes, |b: [u8; 1]| f64::from(b[0]), fill),
        DType::Uint16 => each(bytes, |b| f64::from(u16::from_le_bytes(b)), fill),
        DType::Int16 => each(bytes, |b| f64::from(i16::from_le_bytes(b)), fill),
        DType::Uint32 => each(bytes, |b| f64::from(u32::from_le_bytes(b)), fill),
        DType::Int32 => each(bytes, |b| f64::from(i32::from_le_bytes(b)), fill),
        DType::Float32 => le_floats(bytes),
    }
}

/// Little-endian float32 `bytes` as values, wherever they lie.
fn le_floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect()
}

impl From<Vec<f32>> for Floats {
    fn from(values: Vec<f32>) -> Self {
        Floats::Values(values)
    }
}

impl std::ops::Deref for Floats {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            Floats::Bytes(bytes) => bytemuck::cast_slice(bytes),
            Floats::Values(values) => values,
        }
    }
}

/// Destination of a (sample, step) → batch copy: `base + p · write_p + t · write_t`.
struct Strided {
    base: usize,
    write_p: usize,
    write_t: usize,
}

/// One variable of a pixel-series batch: value (p, t) of `chunk` is at `p · read.0 + t · read.1` (a static
/// variable reads `t · 0`), is normalized as `(x − mean) · inv_std` and goes to `out`.
struct SeriesCopy<'a> {
    chunk: &'a [f32],
    /// The chunk is instead the one decoder `decoder` of [`copy_series`] decodes (time-major chunks).
    decoder: Option<usize>,
    read: (usize, usize),
    out: Strided,
    /// `(mean, inv_std)`; `(0, 1)` leaves values as stored, bit for bit.
    affine: (f32, f32),
}

impl SeriesCopy<'_> {
    /// Step `t` of a time-major chunk `chunk` as a row of the batch's transpose.
    fn row<'c>(&self, chunk: &'c [f32], t: usize, samples: usize) -> Row<'c> {
        let at = t * self.read.1;
        Row {
            values: &chunk[at..at + samples],
            col: self.out.base + t * self.out.write_t,
            affine: self.affine,
        }
    }
}

/// The chunks of a batch as read: those decoded, and the decoders of those left to decode as they are
/// copied (in variable order), `None` in their place.
fn split_decoders(raw: Vec<Chunk>) -> (Vec<Option<Floats>>, Vec<Progressive>) {
    let mut decoders = Vec::new();
    let raw = raw
        .into_iter()
        .map(|chunk| match chunk {
            Chunk::Decoded(floats) => Some(floats),
            Chunk::Decoding(d) => {
                decoders.push(d);
                None
            }
        })
        .collect();
    (raw, decoders)
}

/// For each chunk of [`split_decoders`], the index of its decoder (only the time-major chunks of
/// pixel-series batches are left to decode, by [`Assembler::read_chunk`]).
fn decoder_indices(raw: &[Option<Floats>]) -> impl Iterator<Item = Option<usize>> + '_ {
    let mut next = 0;
    raw.iter().map(move |chunk| {
        chunk.is_none().then(|| {
            next += 1;
            next - 1
        })
    })
}

/// Bytes of each time-major chunk that [`copy_series`] decodes, then transposes, at a time: a zstd block
/// (zstd's blocks hold at most 128 KiB), so that what was decoded is still in the core's cache.
const BLOCK_BYTES: usize = 128 << 10;

/// Copies every variable of a pixel-series batch into `data` and `mask` (every element written: missing
/// values get `fill` and a 0 mask). Time-major chunks (the tiled layouts) are transposed a block of values at
/// a time ([`transpose_rows`]); those still to decode (`decoders`, see [`SeriesCopy::decoder`]) are decoded
/// a block of steps at a time, each block transposed (every variable's steps of it) right after. Sample-major
/// ones (shuffled cubes) already hold each sample's series side by side, and are interleaved sample by
/// sample ([`interleave`]), with any other variable of the batch.
///
/// # Errors
/// The decoder that failed, and why.
fn copy_series<'a>(
    copies: &[SeriesCopy<'a>],
    decoders: &mut [Progressive],
    (samples, steps): (usize, usize),
    fill: f32,
    data: &mut [MaybeUninit<f32>],
    mask: &mut [MaybeUninit<u8>],
) -> Result<(), (usize, String)> {
    let series = |c: &SeriesCopy<'a>| Series {
        values: c.chunk,
        per_sample: c.read.0,
        per_step: c.read.1,
        affine: c.affine,
    };
    if copies.iter().any(|c| c.read.0 != 1) {
        assert!(decoders.is_empty(), "sample-major chunks are decoded whole");
        let nv = copies.len();
        if copies.iter().all(|c| c.out.write_t == 1) {
            // `[V, B, T]`: each variable's block is a batch of one variable.
            for c in copies {
                let block = c.out.base..c.out.base + samples * steps;
                interleave(&[series(c)], samples, steps, fill, &mut data[block.clone()], &mut mask[block]);
            }
            return Ok(());
        }
        assert!(
            copies.iter().enumerate().all(|(v, c)| c.out.base == v && c.out.write_t == nv),
            "`[B, T, V]` with the variables in order"
        );
        let all: Vec<Series<'_>> = copies.iter().map(series).collect();
        interleave(&all, samples, steps, fill, data, mask);
        return Ok(());
    }
    let Some(first) = copies.first() else { return Ok(()) };
    let stride = first.out.write_p;
    assert!(copies.iter().all(|c| c.out.write_p == stride), "one batch row length");
    let dest = Dest::batch(data, samples, stride);
    if decoders.is_empty() {
        let chunks: Vec<&[f32]> = copies.iter().map(|c| c.chunk).collect();
        transpose_rows(
            &series_rows(copies, &chunks, 0..steps, samples),
            samples,
            fill,
            &dest,
            Mask::Bytes(mask),
        );
        return Ok(());
    }
    // Each transpose of a block writes a part of every sample's mask row: the mask is made whole in the
    // thread's cache as bits and streamed after as bytes (where it fits, a mask of up to 16 MiB; otherwise
    // the chunks are decoded whole first).
    with_mask_staged(mask, |mask| transpose_blocks(copies, decoders, (samples, steps), fill, &dest, mask))
}

/// The time-major chunks of `copies` transposed into `dest`, with the mask as bits a block of steps at a
/// time, each decoded just before (by `decoders`, for the copies that have one), while it is in the core's
/// cache; with the mask as bytes, in one transpose.
///
/// # Errors
/// `(k, message)` when decoder `k` fails.
fn transpose_blocks(
    copies: &[SeriesCopy<'_>],
    decoders: &mut [Progressive],
    (samples, steps): (usize, usize),
    fill: f32,
    dest: &Dest<'_>,
    mut mask: Mask<'_>,
) -> Result<(), (usize, String)> {
    // Steps per block: whole cache lines of every sample's values (16 floats, so 16 steps).
    let block = if matches!(mask, Mask::Bits(_)) {
        (BLOCK_BYTES / (samples * size_of::<f32>()).max(1)).max(LINE_FLOATS) / LINE_FLOATS * LINE_FLOATS
    } else {
        steps
    };
    for t0 in (0..steps).step_by(block.max(1)) {
        let t1 = (t0 + block).min(steps);
        for c in copies {
            if let Some(k) = c.decoder {
                let bytes = ((t1 - 1) * c.read.1 + samples) * size_of::<f32>();
                decoders[k].decode_to(bytes).map_err(|e| (k, e))?;
            }
        }
        let chunks: Vec<&[f32]> = copies
            .iter()
            .map(|c| {
                c.decoder.map_or(c.chunk, |k| {
                    let bytes = decoders[k].decoded();
                    // Aligned for f32 (checked when it was read).
                    bytemuck::cast_slice(&bytes[..bytes.len() / 4 * 4])
                })
            })
            .collect();
        let rows = series_rows(copies, &chunks, t0..t1, samples);
        transpose_rows(&rows, samples, fill, dest, mask.reborrow());
    }
    Ok(())
}

/// The rows of steps `steps` of time-major chunks (`chunks[v]` that of `copies[v]`), in column order: step
/// by step across variables (`[B, T, V]`), or variable by variable. (Pushed in plain loops: collected from a
/// `flat_map`, each of the thousands of rows came through a call.)
fn series_rows<'c>(
    copies: &[SeriesCopy<'_>],
    chunks: &[&'c [f32]],
    steps: std::ops::Range<usize>,
    samples: usize,
) -> Vec<Row<'c>> {
    let mut rows: Vec<Row<'c>> = Vec::with_capacity(copies.len() * steps.len());
    if copies.iter().all(|c| c.out.write_t == 1) {
        for (c, values) in copies.iter().zip(chunks) {
            rows.extend(steps.clone().map(|t| c.row(values, t, samples)));
        }
    } else {
        for t in steps {
            rows.extend(copies.iter().zip(chunks).map(|(c, values)| c.row(values, t, samples)));
        }
    }
    rows
}

/// Floats in a cache line.
const LINE_FLOATS: usize = 64 / size_of::<f32>();

/// Decoding options for a reader thread: the loader parallelizes across chunks with its own threads, so a
/// read must not also fan out over rayon's pool (which would make `threads(1)` use every core). Building a
/// loader reads with them too: rayon's pool, once started, has no threads in a process forked after it
/// (a `DataLoader` worker), and a read there would wait for them forever.
#[must_use]
pub fn one_thread() -> zarrs::array::CodecOptions {
    zarrs::array::CodecOptions::default().with_concurrent_target(1)
}

/// The permutation that mixes `total` samples of a group of batches: sample `s` of the group's batches taken
/// one after the other receives sample `order[s]`.
fn mixing_order(total: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..total).collect();
    order.shuffle(rng);
    order
}

/// Permutes the samples of `batches` across all of them by `order` (each batch keeps its size). Each batch is made
/// anew in buffers from the pool ([`buffers`]), its rows copied sample by sample from the batches as
/// assembled and written front to back with non-temporal stores, as the assembly writes; the buffers the
/// batches were assembled in go back to the pool for the next ones.
fn mix(batches: &mut [Batch], order: &[usize]) {
    let sizes: Vec<usize> = batches.iter().map(Batch::len).collect();
    let locate = |mut g: usize| {
        let mut k = 0;
        while g >= sizes[k] {
            g -= sizes[k];
            k += 1;
        }
        (k, g)
    };
    let sources: &[Batch] = batches;
    let mut next = 0;
    let mixed: Vec<Mixed> = sources
        .iter()
        .map(|batch| {
            let picks: Vec<(&Batch, usize)> = order[next..next + batch.len()]
                .iter()
                .map(|&g| {
                    let (k, g) = locate(g);
                    (&sources[k], g)
                })
                .collect();
            next += batch.len();
            Mixed::from_picks(batch, &picks)
        })
        .collect();
    // The rows were streamed: visible to the thread the batches go to only after this fence.
    fence();
    for (batch, m) in batches.iter_mut().zip(mixed) {
        buffers::give_back(std::mem::replace(&mut batch.data, m.data));
        buffers::give_back(std::mem::replace(&mut batch.mask, m.mask));
        batch.statics = m.statics;
        batch.statics_mask = m.statics_mask;
        batch.lat = m.lat;
        batch.lon = m.lon;
        batch.time_index = m.time_index;
    }
}

/// Where [`Assembler::image_sample`] writes: a batch's values and mask, and its statics apart with their mask.
type SampleOut<'a> = (&'a mut [MaybeUninit<f32>], &'a mut [MaybeUninit<u8>], (&'a mut [f32], &'a mut [u8]));

/// What [`mix`] makes of one batch: its samples taken from the batches of the group.
struct Mixed {
    data: Vec<f32>,
    mask: Vec<u8>,
    statics: Vec<f32>,
    statics_mask: Vec<u8>,
    lat: Vec<f64>,
    lon: Vec<f64>,
    time_index: Vec<usize>,
}

impl Mixed {
    /// A batch shaped as `like`, sample `s` of which is sample `picks[s].1` of batch `picks[s].0`.
    fn from_picks(like: &Batch, picks: &[(&Batch, usize)]) -> Mixed {
        // Values are `[outer, B, cell]`: outer = V when variable-major, 1 otherwise.
        let outer = if like.variable_major { like.shape[0] } else { 1 };
        let size = picks.len();
        let cells = like.data.len();
        let cell = cells / size.max(1) / outer;
        // Row `o` of sample `(from, g)`: where it lies in `from`.
        let rows = |o: usize| picks.iter().map(move |&(from, g)| (from, (o * from.len() + g) * cell..));
        let mut data: Vec<f32> = buffers::take(cells);
        let mut mask: Vec<u8> = buffers::take(cells);
        let data_rows = (0..outer).flat_map(|o| {
            rows(o).map(|(from, at)| bytemuck::cast_slice::<f32, u8>(&from.data[at.start..at.start + cell]))
        });
        let data_out = &mut data.spare_capacity_mut()[..cells];
        // SAFETY: the same memory as bytes (`MaybeUninit<u8>` has no invalid values, `f32` no padding).
        let data_bytes = unsafe {
            std::slice::from_raw_parts_mut(data_out.as_mut_ptr().cast::<MaybeUninit<u8>>(), cells * 4)
        };
        stream_rows(data_rows, data_bytes);
        let mask_rows =
            (0..outer).flat_map(|o| rows(o).map(|(from, at)| &from.mask[at.start..at.start + cell]));
        stream_rows(mask_rows, &mut mask.spare_capacity_mut()[..cells]);
        // SAFETY: `stream_rows` wrote every element of both (it checks that the rows fill them).
        unsafe {
            data.set_len(cells);
            mask.set_len(cells);
        }
        let scell = like.statics.len() / size.max(1);
        Mixed {
            data,
            mask,
            statics: picks
                .iter()
                .flat_map(|&(from, g)| &from.statics[g * scell..(g + 1) * scell])
                .copied()
                .collect(),
            statics_mask: picks
                .iter()
                .flat_map(|&(from, g)| &from.statics_mask[g * scell..(g + 1) * scell])
                .copied()
                .collect(),
            lat: picks.iter().map(|&(from, g)| from.lat[g]).collect(),
            lon: picks.iter().map(|&(from, g)| from.lon[g]).collect(),
            time_index: picks.iter().map(|&(from, g)| from.time_index[g]).collect(),
        }
    }
}

/// Shared handle.
pub type SharedAssembler = Arc<Assembler>;

#[cfg(test)]
mod tests {
    use super::super::{Loader, LoaderError};
    use super::*;

    /// Every integer type cubeload stores, decoded from its little-endian bytes, against the values written.
    #[test]
    fn integer_chunks_become_floats_with_nan_for_the_fill() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let check = |dtype, bytes: Vec<u8>, fill, expected: &[f32]| {
            assert_eq!(bits(&le_ints_as_floats(&bytes, dtype, fill)), bits(expected), "{dtype:?}");
        };
        check(DType::Uint8, vec![0, 7, 255], Some(255.0), &[0.0, 7.0, f32::NAN]);
        let u16s: Vec<u8> = [1u16, 65535, 300].iter().flat_map(|x| x.to_le_bytes()).collect();
        check(DType::Uint16, u16s, Some(65535.0), &[1.0, f32::NAN, 300.0]);
        let i16s: Vec<u8> = [-5i16, 300, -32768].iter().flat_map(|x| x.to_le_bytes()).collect();
        check(DType::Int16, i16s, Some(-5.0), &[f32::NAN, 300.0, -32768.0]);
        let u32s: Vec<u8> = [4_000_000_000u32, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
        check(DType::Uint32, u32s, None, &[4e9, 3.0]);
        let i32s: Vec<u8> = [i32::MIN, 11, -7].iter().flat_map(|x| x.to_le_bytes()).collect();
        check(DType::Int32, i32s, Some(f64::from(i32::MIN)), &[f32::NAN, 11.0, -7.0]);
    }

    /// The demo's cube of 24 steps at 0.04°, made with one thread in `dir`: a few sharded chunks.
    fn small_cube(dir: &std::path::Path) -> std::path::PathBuf {
        let spec = crate::demo::DemoSpec { hours: 24, resolution: 0.04, ..Default::default() };
        crate::demo::build_cube(dir, &spec, Some(1)).unwrap().path
    }

    /// A bug in a reader thread (here: coordinates shorter than the grid, which the checks of
    /// [`Assembler::new`] would refuse, so they are cut after it) panics while assembling; the panic must
    /// reach the consumer as an error, end the stream, and leave the loader droppable.
    #[test]
    fn a_panic_in_a_reader_arrives_as_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cube = small_cube(dir.path());
        for threads in [0, 2] {
            let cube = Cube::open(&cube).unwrap();
            let builder = Loader::builder(cube.path()).threads(threads);
            let mut assembler = Assembler::new(&cube, &[], builder.transform).unwrap();
            let validity = assembler.validity(&cube).unwrap();
            assembler.lat.clear();
            let mut loader = builder.start(assembler, &validity, None, 2).unwrap();
            match loader.next() {
                Some(Err(LoaderError::Panic(message))) => {
                    assert!(message.contains("index out of bounds"), "{message}");
                }
                other => panic!("threads {threads}: expected a panic error, got {other:?}"),
            }
            assert!(loader.next().is_none(), "the stream ends after a panic");
        }
    }

    /// A shard index the store failed to give is read again for the shard's next chunk (an object store's
    /// error may not recur); one the store does not have stays remembered.
    #[test]
    fn a_failed_index_read_is_tried_again_and_a_missing_index_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let cube = small_cube(dir.path());
        let cube = Cube::open(&cube).unwrap();
        let storage = cube.array("t2m").unwrap().storage();
        let plan = |assembler: &Assembler, read: StoreRead<'_>| assembler.planned_reads(&[[0, 0, 0]], read);
        let index_reads = std::sync::atomic::AtomicUsize::new(0);
        let counted = |key: &StoreKey, range| {
            if matches!(range, ByteRange::Suffix(_)) {
                index_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            storage.get_partial(key, range)
        };
        let failing =
            |_: &StoreKey, _| Err(zarrs::storage::StorageError::Other("the store hiccupped".into()));
        let missing = |_: &StoreKey, _| Ok(None);

        let assembler = Assembler::new(&cube, &[], Transform::default()).unwrap();
        let whole = plan(&assembler, &counted).len();
        assert!(whole > 0, "the chunk's reads, planned from its shards' indexes");
        let assembler = Assembler::new(&cube, &[], Transform::default()).unwrap();
        assert!(plan(&assembler, &failing).len() < whole, "no index: the readers read through zarrs");
        let before = index_reads.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(plan(&assembler, &counted).len(), whole, "the indexes read again");
        assert!(index_reads.load(std::sync::atomic::Ordering::Relaxed) > before);
        let assembler = Assembler::new(&cube, &[], Transform::default()).unwrap();
        assert!(plan(&assembler, &missing).len() < whole);
        assert!(plan(&assembler, &counted).len() < whole, "a missing index stays remembered");
    }

    /// An index shorter than its codecs make it (a store answering a range with fewer bytes) is not used,
    /// though its whole entries would pass for an index without a checksum.
    #[test]
    fn an_index_cut_to_whole_entries_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let cube = small_cube(dir.path());
        let cube = Cube::open(&cube).unwrap();
        let storage = cube.array("t2m").unwrap().storage();
        let plan = |read: StoreRead<'_>| {
            Assembler::new(&cube, &[], Transform::default()).unwrap().planned_reads(&[[0, 0, 0]], read)
        };
        let whole = plan(&|key: &StoreKey, range| storage.get_partial(key, range)).len();
        // The index's first entry and its checksum left out: 16-byte entries, shifted by one.
        let short = |key: &StoreKey, range| {
            let bytes = storage.get_partial(key, range)?;
            Ok(match range {
                ByteRange::Suffix(_) => bytes.map(|b| b.slice(16..b.len() - 4)),
                ByteRange::FromStart(..) => bytes,
            })
        };
        assert!(plan(&short).len() < whole, "the shard's chunks are left to zarrs");
    }

    /// [`copy_series`] against the obvious element-by-element copy, for every read and write pattern of
    /// pixel-series batches (time-major, sample-major and static chunks; `[B, T, V]` and `[V, B, T]`), with
    /// missing values, normalization and a sample count that is not a whole number of tiles.
    type Source<'a> = (&'a [f32], (usize, usize), (f32, f32));

    #[test]
    fn series_copy_equals_the_element_by_element_copy() {
        // A few samples and steps; then enough that the time-major chunk spans several zstd blocks, which
        // the progressive copy decodes a block of steps at a time (blocks of 32 steps here, ending inside
        // zstd's blocks of 128 KiB), with a ragged tail of samples.
        for (samples, steps) in [(37, 29), (1003, 100)] {
            for progressive in [false, true] {
                assert_series_copy_as_defined(samples, steps, progressive);
            }
        }
    }

    /// Encodes `values` as cubeload stores a chunk: zstd, then the CRC32C of the compressed bytes.
    fn encoded(values: &[f32]) -> zarrs::storage::Bytes {
        let raw: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut encoded = zstd::bulk::compress(&raw, 3).unwrap();
        let checksum = crc32c::crc32c(&encoded);
        encoded.extend_from_slice(&checksum.to_le_bytes());
        encoded.into()
    }

    fn assert_series_copy_as_defined(samples: usize, steps: usize, progressive: bool) {
        let fill = -7.5;
        let value = |k: usize| if k % 7 == 3 { f32::NAN } else { (k as f32).sin() * 40.0 };
        let time_major: Vec<f32> = (0..samples * steps).map(value).collect();
        let sample_major: Vec<f32> = (0..samples * steps).map(|k| value(k + 1)).collect();
        let statics: Vec<f32> = (0..samples).map(|k| value(k + 2)).collect();
        // (chunk, read strides, (mean, inv_std)) of each variable; sample-major chunks are not decoded
        // progressively (nor mixed with those that are).
        let mut sources: Vec<Source<'_>> =
            vec![(&time_major, (1, samples), (3.0, 0.25)), (&statics, (1, 0), (-1.0, 2.0))];
        if !progressive {
            sources.insert(1, (&sample_major, (steps, 1), (0.0, 1.0)));
        }
        let nv = sources.len();
        for variable_major in [false, true] {
            let strides = |v: usize| {
                if variable_major {
                    Strided { base: v * samples * steps, write_p: steps, write_t: 1 }
                } else {
                    Strided { base: v, write_p: steps * nv, write_t: nv }
                }
            };
            let mut decoders = Vec::new();
            let copies: Vec<SeriesCopy<'_>> = sources
                .iter()
                .enumerate()
                .map(|(v, &(chunk, read, affine))| {
                    let decoder = (progressive && v == 0).then(|| {
                        decoders.push(Progressive::new(encoded(chunk), chunk.len() * 4).unwrap());
                        decoders.len() - 1
                    });
                    let chunk = if decoder.is_some() { &[][..] } else { chunk };
                    SeriesCopy { chunk, decoder, read, out: strides(v), affine }
                })
                .collect();
            let cells = samples * steps * nv;
            let (mut data, mut mask) =
                (vec![MaybeUninit::new(f32::INFINITY); cells], vec![MaybeUninit::new(9u8); cells]);
            copy_series(&copies, &mut decoders, (samples, steps), fill, &mut data, &mut mask).unwrap();
            for (v, &(chunk, (read_p, read_t), (mean, inv))) in sources.iter().enumerate() {
                let out = strides(v);
                for p in 0..samples {
                    for t in 0..steps {
                        let x = chunk[p * read_p + t * read_t];
                        let o = out.base + p * out.write_p + t * out.write_t;
                        let expected = if x.is_nan() { (fill, 0) } else { ((x - mean) * inv, 1) };
                        assert_eq!(
                            // SAFETY: every element was initialized (to infinity and 9) before the copy.
                            unsafe { (data[o].assume_init().to_bits(), mask[o].assume_init()) },
                            (expected.0.to_bits(), expected.1),
                            "{v} {p} {t} ({samples} × {steps}, progressive: {progressive})"
                        );
                    }
                }
            }
        }
    }

    /// A chunk whose checksum is right but whose zstd frame ends early (or holds more than the chunk) is an
    /// error of its decoder, found as the copy reaches it, not a panic or a batch with holes.
    #[test]
    fn a_frame_that_does_not_make_the_chunk_is_an_error() {
        let (samples, steps) = (1003, 100);
        let values: Vec<f32> = (0..samples * steps).map(|k| k as f32).collect();
        let copy = |encoded: zarrs::storage::Bytes, len: usize| {
            let mut decoders = vec![Progressive::new(encoded, len).unwrap()];
            let copies = [SeriesCopy {
                chunk: &[],
                decoder: Some(0),
                read: (1, samples),
                out: Strided { base: 0, write_p: steps, write_t: 1 },
                affine: (0.0, 1.0),
            }];
            let cells = samples * steps;
            let (mut data, mut mask) =
                (vec![MaybeUninit::new(0.0f32); cells], vec![MaybeUninit::new(0u8); cells]);
            copy_series(&copies, &mut decoders, (samples, steps), 0.0, &mut data, &mut mask)
        };
        // Steps short of the chunk, and more than it.
        let short = copy(encoded(&values[..values.len() - samples]), values.len() * 4).unwrap_err();
        assert_eq!(short.0, 0);
        assert!(short.1.contains("zstd gave 397188 bytes, the chunk holds 401200"), "{}", short.1);
        let long = copy(encoded(&values), (values.len() - samples) * 4);
        assert!(long.unwrap_err().1.contains("zstd"));
        // A frame cut inside a block, its checksum made for the cut bytes.
        let whole = encoded(&values);
        let mut cut = whole[..whole.len() / 2].to_vec();
        let checksum = crc32c::crc32c(&cut);
        cut.extend_from_slice(&checksum.to_le_bytes());
        let cut = copy(cut.into(), values.len() * 4).unwrap_err();
        assert!(cut.1.contains("truncated"), "{}", cut.1);
    }

    /// Decoded bytes are viewed in place when aligned, copied otherwise, with the same values either way.
    #[test]
    fn decoded_bytes_read_as_the_same_floats_aligned_or_not() {
        let values = [1.5f32, -0.0, f32::NAN, 3.25e-3];
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let bits = |floats: &[f32]| floats.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let viewed = Floats::from_le_bytes(bytes.clone());
        assert!(matches!(viewed, Floats::Bytes(_)), "a fresh allocation is aligned for f32");
        assert_eq!(bits(&viewed), bits(&values));
        assert_eq!(bits(&viewed.into_vec()), bits(&values));
        // The same bytes one past an aligned address: read by value.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert!(bytemuck::try_cast_slice::<u8, f32>(&shifted[1..]).is_err(), "unaligned");
        assert_eq!(bits(&le_floats(&shifted[1..])), bits(&values));
    }
}
