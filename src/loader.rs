//! The loader: shuffled, aligned, multivariate batches from a cube, prefetched by reader threads.
//!
//! ```no_run
//! use cubeload::loader::Loader;
//! let loader = Loader::builder("cubes/uk.zarr").variables(["t2m"]).shuffle(42).epochs(10).prefetch(4).build()?;
//! for batch in loader {
//!     let batch = batch?; // [B, T, V] in batch.data, batch.mask beside it
//! }
//! # Ok::<(), cubeload::loader::LoaderError>(())
//! ```
//!
//! - Order: [`sampler`] (seeded permutation of chunks per epoch, equal shares per rank).
//! - Reading: [`assemble`] (one chunk read per variable, one pass into the batch layout), with float32
//!   chunks decoded by `decode` (straight from their stored bytes), pixel series transposed by `transpose`
//!   (time-major chunks, 8 × 8 values at a time) or interleaved by `interleave` (sample-major chunks of
//!   shuffled cubes); variables on coarser levels regridded by [`regrid`].
//! - Buffers: [`buffers`] keeps the batches' values and masks given back by the consumer (`cubeload-torch`'s
//!   tensors, the Python arrays, [`Batch::recycle`]) for the next batches of any loader of the process.
//! - Prefetch: reader threads take jobs in order but never more than `prefetch` ahead of the consumer (by
//!   default as many batches as 32 MiB hold, 4 to 1024), and send results through a bounded channel; the
//!   consumer puts them back in order. Dropping the loader stops and joins every thread (one still waiting on
//!   its store after [`DROP_GRACE`] is left to end alone); an error or a panic in a reader arrives as an
//!   `Err` from the iterator.
//! - Resume: [`Loader::state`] is a small serializable value; a loader built from it delivers exactly the
//!   batches not yet delivered.
//! - Corruption: a chunk that cannot be read or decoded (every stored chunk carries a CRC32C checksum) ends
//!   the stream with an error naming it, or with [`OnCorrupt::Skip`] is left out and counted.

pub mod assemble;
pub mod buffers;
pub(crate) mod decode;
mod interleave;
pub mod regrid;
pub mod sampler;
pub(crate) mod transpose;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use self::assemble::{Assembler, Planned, Transform, Validity};
use self::sampler::{ChunkId, Sampler, Share};
use crate::batch::Batch;
use crate::cube::reader::Cube;
use crate::cube::{CubeError, CubeMeta};
use crate::store::{Location, ReadaheadStore};
use zarrs::storage::StoreKey;
use zarrs::storage::byte_range::ByteRange;

/// A loader error: names the cube, variable or chunk at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoaderError {
    /// The cube cannot be opened (missing, incomplete, not a cube).
    #[error(transparent)]
    Cube(#[from] CubeError),
    /// A requested variable is not in the cube.
    #[error("unknown variable `{name}`; the cube has: {}", available.join(", "))]
    UnknownVariable {
        /// The requested name.
        name: String,
        /// What the cube has.
        available: Vec<String>,
    },
    /// A builder option makes no sense.
    #[error("invalid loader option: {0}")]
    Invalid(String),
    /// A chunk cannot be read or decoded (missing, truncated, corrupt).
    #[error("variable `{variable}`, chunk {chunk:?}: {message}")]
    Read {
        /// The variable.
        variable: String,
        /// Chunk indices `[time, lat, lon]`.
        chunk: ChunkId,
        /// What failed.
        message: String,
    },
    /// The system started fewer threads than asked (a limit on threads or memory).
    #[error(
        "cannot start the loader's threads ({} readers, {} fetchers asked; the system refused after {started}): \
         {source}; ask fewer",
        asked.0,
        asked.1
    )]
    Threads {
        /// Reader and fetch threads asked.
        asked: (usize, usize),
        /// Threads started before the refusal (stopped again).
        started: usize,
        /// The system's error.
        source: std::io::Error,
    },
    /// A reader thread panicked (a bug); the message is the panic's.
    #[error("a reader thread panicked: {0}")]
    Panic(String),
    /// The cube was deleted or replaced while the loader read it: `cubeload gen` replaced it.
    #[error(
        "{}: the cube was deleted or replaced while this loader read it (by `cubeload gen --overwrite` or \
         `--append`?); what it had not read yet is gone: build a loader over the cube now there",
        path.display()
    )]
    CubeDeleted {
        /// The cube's path.
        path: std::path::PathBuf,
    },
    /// The object store holding the cube does not answer (a network outage): an error whatever
    /// [`OnCorrupt`] says, since no chunk of it is damaged.
    #[error("{}: the store does not answer: {message}", path.display())]
    StoreUnreachable {
        /// The cube's path.
        path: std::path::PathBuf,
        /// The failed read.
        message: String,
    },
}

/// Where a loader stands: enough to resume exactly, small and serializable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Seed of the shuffle and of the mixing.
    pub seed: u64,
    /// Whether epochs are shuffled.
    pub shuffle: bool,
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Batches of the current epoch already delivered.
    pub cursor: usize,
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Worker within the rank.
    #[serde(default)]
    pub worker: usize,
    /// Workers per rank.
    #[serde(default = "one")]
    pub workers: usize,
    /// Chunks mixed per group.
    pub mix: usize,
    /// Digest of the variables and of the chunks the epochs permute (those the cube, the variables and
    /// `min_valid` leave eligible): a state resumed where they differ would deliver other batches, and is
    /// refused. Absent in states of earlier versions, which are not checked (but for a mid-epoch state that
    /// mixed across several ranks or workers, whose groups this version makes differently: refused).
    #[serde(default)]
    pub digest: Option<u64>,
}

fn one() -> usize {
    1
}

/// How a multi-resolution cube's coarser variables are delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Regrid {
    /// Regridded on the fly onto the batch's target cells with each variable's `upsampling` (nearest or
    /// bilinear), alongside the other variables in `data`.
    #[default]
    Target,
    /// At their own resolution, one [`crate::batch::NativeField`] each in `Batch::native`, for multi-scale
    /// models.
    Native,
}

/// What the loader does with a chunk that cannot be read or decoded (a checksum mismatch, a truncated file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnCorrupt {
    /// End the stream with [`LoaderError::Read`] naming the variable and chunk: nothing is lost silently.
    #[default]
    Error,
    /// Leave the batch out and count it ([`Loader::corrupt_chunks`]), so that a long run survives one damaged
    /// chunk.
    Skip,
}

/// Builds a [`Loader`]; validates in [`LoaderBuilder::build`].
#[derive(Debug, Clone)]
pub struct LoaderBuilder {
    path: PathBuf,
    variables: Vec<String>,
    seed: u64,
    shuffle: bool,
    epochs: usize,
    /// `None`: from the batch size ([`default_prefetch`]).
    prefetch: Option<usize>,
    threads: usize,
    share: Share,
    mix: usize,
    transform: Transform,
    min_valid: Option<f64>,
    /// The state given to [`LoaderBuilder::resume`]: its options are applied by `build`, which starts at its
    /// epoch and cursor and checks its digest against the loader's.
    saved: Option<LoaderState>,
    /// Which of the options a state carries were given, in any order with `resume`.
    given: Given,
    on_corrupt: OnCorrupt,
    store: Option<CustomStore>,
    fetchers: usize,
}

/// The options of a [`LoaderState`] given to the builder: with a resumed state, each must agree with it.
#[derive(Debug, Clone, Copy, Default)]
struct Given {
    seed: Option<u64>,
    /// Whether [`LoaderBuilder::shuffle`] was called.
    shuffle: bool,
    shard: Option<(usize, usize)>,
    worker: Option<(usize, usize)>,
    mix: Option<usize>,
}

/// A store given to [`LoaderBuilder::store`].
#[derive(Clone)]
struct CustomStore(zarrs::storage::ReadableStorage);

impl std::fmt::Debug for CustomStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CustomStore")
    }
}

impl LoaderBuilder {
    /// Read the cube through `store` instead of opening its path (a wrapped store: one that measures, caches
    /// or, in the benchmark, adds an object store's latency). > default: the path's own store
    #[must_use]
    pub fn store(mut self, store: zarrs::storage::ReadableStorage) -> Self {
        self.store = Some(CustomStore(store));
        self
    }

    /// Variables along `V`, in this order. > default: all, in the cube's order
    #[must_use]
    pub fn variables<I: IntoIterator<Item = S>, S: Into<String>>(mut self, names: I) -> Self {
        self.variables = names.into_iter().map(Into::into).collect();
        self
    }
    /// Shuffle chunks each epoch with this seed. > default: no shuffle, natural order
    #[must_use]
    pub fn shuffle(mut self, seed: u64) -> Self {
        self.seed = seed;
        self.shuffle = true;
        (self.given.seed, self.given.shuffle) = (Some(seed), true);
        self
    }
    /// The seed of mixing (`mix`) without shuffling; [`LoaderBuilder::shuffle`] sets it too. > default: 0
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self.given.seed = Some(seed);
        self
    }
    /// Number of epochs. > default: 1
    #[must_use]
    pub fn epochs(mut self, epochs: usize) -> Self {
        self.epochs = epochs;
        self
    }
    /// Batches read ahead of the consumer. > default: as many as [`PREFETCH_BYTES`] hold, between
    /// [`MIN_PREFETCH`] and [`MAX_PREFETCH`] ([`Loader::prefetch_depth`] says how many)
    #[must_use]
    pub fn prefetch(mut self, depth: usize) -> Self {
        self.prefetch = Some(depth);
        self
    }
    /// Reader threads; 0 reads on the consumer's thread. > default: 2
    #[must_use]
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }
    /// This process's share for distributed training: rank `rank` of `world_size`.
    #[must_use]
    pub fn shard(mut self, rank: usize, world_size: usize) -> Self {
        self.share.rank = rank;
        self.share.world_size = world_size;
        self.given.shard = Some((rank, world_size));
        self
    }
    /// This reader's share within its rank: worker `worker` of `workers` (`PyTorch` `DataLoader` workers).
    /// Workers split the rank's batches without dropping any. > default: 0 of 1
    #[must_use]
    pub fn worker(mut self, worker: usize, workers: usize) -> Self {
        self.share.worker = worker;
        self.share.workers = workers;
        self.given.worker = Some((worker, workers));
        self
    }
    /// Deliver `data` and `mask` variable-major, `[V, B, T]` or `[V, B, S, h, w]`, so that each variable is
    /// contiguous (the Python binding hands out per-variable arrays without copying). > default: false
    #[must_use]
    pub fn variable_major(mut self, variable_major: bool) -> Self {
        self.transform.variable_major = variable_major;
        self
    }
    /// Mix samples across groups of `k` chunks, so that a batch is not one spatial tile (memory: k chunks).
    /// Each chunk's samples are written straight to their places in the group's batches, so mixing writes
    /// no more than reading unmixed batches; cubes stored `order: shuffled` (whose batches are random
    /// already) copy each batch's samples to their places once. > default: 1 (no mixing)
    #[must_use]
    pub fn mix(mut self, k: usize) -> Self {
        self.mix = k;
        self.given.mix = Some(k);
        self
    }
    /// Normalize continuous variables with the cube's statistics. > default: false
    #[must_use]
    pub fn normalize(mut self, normalize: bool) -> Self {
        self.transform.normalize = normalize;
        self
    }
    /// Value written where data is missing (the mask says where). > default: 0.0
    #[must_use]
    pub fn fill_value(mut self, fill: f32) -> Self {
        self.transform.fill = fill;
        self
    }
    /// Threads that fetch the chunks of upcoming batches from a slow store (an object store) while the reader
    /// threads decode: they only wait on the network, so there may be many more of them than cores.
    /// Local cubes do not use them. > default: 32
    #[must_use]
    pub fn fetchers(mut self, fetchers: usize) -> Self {
        self.fetchers = fetchers;
        self
    }
    /// Multi-resolution cubes: how variables stored at a coarser resolution are delivered.
    /// > default: [`Regrid::Target`]
    #[must_use]
    pub fn regrid(mut self, regrid: Regrid) -> Self {
        self.transform.regrid = regrid;
        self
    }
    /// Return static variables separately instead of repeating them along time. > default: false
    #[must_use]
    pub fn separate_statics(mut self, separate: bool) -> Self {
        self.transform.separate_statics = separate;
        self
    }
    /// Skip batches whose valid fraction is below `fraction`, without reading them: from the cube's validity
    /// index, over the batch's cells inside the cube (an edge batch's padding left out), averaged over the
    /// variables.
    /// `0.0` skips none, empty batches included. > default: skip only batches with no valid value at all
    #[must_use]
    pub fn min_valid(mut self, fraction: f64) -> Self {
        self.min_valid = Some(fraction);
        self
    }
    /// What to do with a chunk that cannot be read or decoded. > default: [`OnCorrupt::Error`]
    #[must_use]
    pub fn on_corrupt(mut self, policy: OnCorrupt) -> Self {
        self.on_corrupt = policy;
        self
    }
    /// Continue from a saved [`LoaderState`]: same seed, shuffle, shard, workers and mixing, next batch
    /// onwards. Those options may be left out; given (before or after `resume`), `build` refuses any that
    /// disagrees with the state, as it refuses a state whose digest is not the loader's (a cube, variables or
    /// `min_valid` that leave other batches eligible): either would deliver other batches than the ones not
    /// yet delivered.
    #[must_use]
    pub fn resume(mut self, state: LoaderState) -> Self {
        self.saved = Some(state);
        self
    }

    /// Applies the options of the state given to [`LoaderBuilder::resume`], if any: where given, they agree.
    fn apply_saved(&mut self) -> Result<(), LoaderError> {
        let Some(state) = self.saved else { return Ok(()) };
        let given = self.given;
        let disagree = |option: String, saved: String| {
            LoaderError::Invalid(format!(
                "{option} disagrees with the resume state, saved with {saved}: a state continues with its own \
                 seed, shuffle, shard, worker and mix (leave the option out, or give the state's)"
            ))
        };
        if given.shuffle && !state.shuffle {
            return Err(disagree(format!("shuffle({})", self.seed), "no shuffle".into()));
        }
        if let Some(seed) = given.seed.filter(|&seed| seed != state.seed) {
            return Err(disagree(format!("seed {seed}"), format!("seed {}", state.seed)));
        }
        if let Some((rank, world_size)) = given.shard.filter(|&s| s != (state.rank, state.world_size)) {
            return Err(disagree(
                format!("shard({rank}, {world_size})"),
                format!("rank {} of world size {}", state.rank, state.world_size),
            ));
        }
        if let Some((worker, workers)) = given.worker.filter(|&w| w != (state.worker, state.workers)) {
            return Err(disagree(
                format!("worker({worker}, {workers})"),
                format!("worker {} of {}", state.worker, state.workers),
            ));
        }
        if let Some(mix) = given.mix.filter(|&mix| mix != state.mix) {
            return Err(disagree(format!("mix({mix})"), format!("mix {}", state.mix)));
        }
        self.seed = state.seed;
        self.shuffle = state.shuffle;
        self.share = Share {
            rank: state.rank,
            world_size: state.world_size,
            worker: state.worker,
            workers: state.workers,
        };
        self.mix = state.mix;
        Ok(())
    }

    /// Opens the cube and starts the reader threads.
    ///
    /// # Errors
    /// [`LoaderError`] when the cube cannot be opened, a variable is unknown, or an option is invalid;
    /// [`LoaderError::Threads`] when the system will not start the reader threads.
    pub fn build(mut self) -> Result<Loader, LoaderError> {
        self.apply_saved()?;
        let Share { rank, world_size, worker, workers } = self.share;
        if world_size == 0 || rank >= world_size {
            return Err(LoaderError::Invalid(format!("rank {rank} of world size {world_size}")));
        }
        if workers == 0 || worker >= workers {
            return Err(LoaderError::Invalid(format!("worker {worker} of {workers}")));
        }
        if self.epochs == 0 {
            return Err(LoaderError::Invalid(
                "epochs 0: a loader of no epoch delivers nothing; at least 1".into(),
            ));
        }
        if self.mix == 0 {
            return Err(LoaderError::Invalid("mix 0: chunks mixed per group, at least 1".into()));
        }
        if self.prefetch == Some(0) {
            return Err(LoaderError::Invalid("prefetch 0: batches read ahead, at least 1".into()));
        }
        if let Some(min) = self.min_valid.filter(|m| !(0.0..=1.0).contains(m)) {
            return Err(LoaderError::Invalid(format!("min_valid {min}: a fraction of valid values, 0 to 1")));
        }
        if let Some(twice) = self.variables.iter().enumerate().find(|(i, v)| self.variables[..*i].contains(v))
        {
            return Err(LoaderError::Invalid(format!("variable `{}` asked twice", twice.1)));
        }
        if self.transform.regrid == Regrid::Native && self.mix > 1 {
            return Err(LoaderError::Invalid(
                "regrid native keeps each batch one footprint: it cannot mix samples across chunks".into(),
            ));
        }
        let location = Location::parse(&self.path);
        let (store, gone, slow) = if let Some(CustomStore(store)) = &self.store {
            (store.clone(), None, true)
        } else {
            let (store, gone) = location.readable_watched()?;
            (store, gone, matches!(location, Location::S3 { .. }))
        };
        // A slow store gets fetch threads in front of the readers (not when reading on the calling thread).
        let readahead = (slow && self.threads > 0 && self.fetchers > 0)
            .then(|| Arc::new(ReadaheadStore::new(store.clone(), 1)));
        let cube = match &readahead {
            Some(readahead) => Cube::open_store(&location, readahead.clone())?.watched(gone),
            None if slow => Cube::open_store(&location, store)?.watched(gone),
            None => Cube::open(&self.path)?,
        };
        let mut assembler = Assembler::new(&cube, &self.variables, self.transform)?;
        assembler.read_fetched(readahead.is_some());
        let prefetch = self.prefetch.unwrap_or_else(|| default_prefetch(assembler.batch_bytes()));
        if let Some(readahead) = &readahead {
            // Room for the reads of every batch within the prefetch depth and in the readers' hands, twice.
            let jobs = prefetch.saturating_add(self.threads).saturating_add(self.fetchers);
            readahead
                .set_capacity(jobs.saturating_mul(self.mix).saturating_mul(2 * assembler.variable_count()));
        }
        let validity = assembler.validity(&cube)?;
        self.start(assembler, &validity, readahead, prefetch)
    }

    /// Starts the reader (and fetch) threads over an opened cube; `validity` is the valid fraction of each
    /// chunk.
    fn start(
        self,
        assembler: Assembler,
        validity: &[Validity],
        readahead: Option<Arc<ReadaheadStore>>,
        prefetch: usize,
    ) -> Result<Loader, LoaderError> {
        let Share { rank, world_size, worker, workers } = self.share;
        let with_data = validity.iter().filter(|v| v.fraction > 0.0).count();
        let sampler_by = |fraction: fn(&Validity) -> f64| {
            let eligible: Vec<ChunkId> = validity
                .iter()
                .filter(|v| match self.min_valid {
                    Some(min) => fraction(v) >= min,
                    None => fraction(v) > 0.0,
                })
                .map(|v| v.id)
                .collect();
            let sampler = Sampler::new(eligible, self.seed, self.shuffle, self.share, self.mix);
            let (names, statics) = assembler.variable_names();
            let digest =
                sampler.digest(&names.iter().chain(&statics).map(String::as_str).collect::<Vec<_>>());
            (sampler, digest)
        };
        let (mut sampler, mut digest) = sampler_by(|v| v.fraction);
        let saved_digest = self.saved.and_then(|state| state.digest);
        if let Some(saved) = saved_digest.filter(|&saved| saved != digest) {
            // A state saved by a version whose `min_valid` counted an edge batch's padding as missing
            // continues the batches it chose.
            let (before, digest_before) = sampler_by(|v| v.fraction_before);
            if self.min_valid.is_none() || saved != digest_before {
                return Err(LoaderError::Invalid(format!(
                    "the resume state was saved on another cube, or with other variables or another min_valid: \
                     the batches it continues are not this loader's (digest {saved:016x}, this loader's \
                     {digest:016x})"
                )));
            }
            // Its states carry that rule's digest, so that a resume of them continues the same batches.
            (sampler, digest) = (before, digest_before);
        }
        let n_eligible = sampler.eligible_count();
        // Options that leave a run no batch at all, where the cube has some: an error, not empty epochs.
        if n_eligible == 0 && with_data > 0 {
            return Err(LoaderError::Invalid(format!(
                "min_valid {}: none of the {with_data} batches holding data has that share of valid values",
                self.min_valid.unwrap_or(0.0)
            )));
        }
        if n_eligible > 0 && n_eligible < world_size {
            return Err(LoaderError::Invalid(format!(
                "world size {world_size}: an epoch has {n_eligible} batches, fewer than the ranks, so every rank \
                 would get none"
            )));
        }
        let (mut epoch, mut cursor) = self.saved.map_or((0, 0), |state| (state.epoch, state.cursor));
        // A cursor at the end of an epoch is the next epoch's start.
        if cursor == sampler.per_epoch() && cursor > 0 {
            (epoch, cursor) = (epoch.saturating_add(1), 0);
        }
        // Before the digest (earlier versions), groups were mixed by a job index counted per worker: a mixed
        // state of several ranks or workers would resume an epoch of other batches in its middle (an epoch's
        // start is whole either way).
        if self.saved.is_some()
            && saved_digest.is_none()
            && cursor > 0
            && self.mix > 1
            && (world_size > 1 || workers > 1)
        {
            return Err(LoaderError::Invalid(
                "the resume state was saved by an earlier version with mixing across several ranks or workers, \
                 whose batches this version makes differently: start the epoch again"
                    .into(),
            ));
        }
        if cursor > sampler.per_epoch() {
            return Err(LoaderError::Invalid(format!(
                "resume cursor {cursor} is past the {} batches of an epoch",
                sampler.per_epoch()
            )));
        }
        // A state of a run of more epochs than asked would deliver nothing, silently.
        if epoch > self.epochs || (epoch == self.epochs && cursor > 0) {
            return Err(LoaderError::Invalid(format!(
                "resume state at epoch {epoch} (batch {cursor}) is past the {} epochs asked: ask as many epochs \
                 as the run it continues",
                self.epochs
            )));
        }
        let per_job = sampler.mix();
        // Checked: in a release build a product past usize::MAX wrapped, and `epochs` meaning "forever" gave
        // one batch.
        let too_many = || {
            LoaderError::Invalid(format!(
                "epochs {}: {} jobs per epoch, more in all than this machine can count",
                self.epochs,
                sampler.jobs_per_epoch()
            ))
        };
        let first_job = epoch
            .checked_mul(sampler.jobs_per_epoch())
            .and_then(|j| j.checked_add(cursor / per_job))
            .ok_or_else(too_many)?;
        let total_jobs = self.epochs.checked_mul(sampler.jobs_per_epoch()).ok_or_else(too_many)?;
        let state = LoaderState {
            seed: self.seed,
            shuffle: self.shuffle,
            epoch,
            cursor,
            rank,
            world_size,
            worker,
            workers,
            mix: self.mix,
            digest: Some(digest),
        };
        let shared = Arc::new(Shared {
            assembler,
            sampler,
            seed: self.seed,
            jobs: Mutex::new(Cursor {
                next_read: first_job,
                next_fetch: first_job,
                fetched: BTreeSet::new(),
                readers_waiting: 0,
                fetchers_waiting: 0,
            }),
            readahead,
            delivered: AtomicUsize::new(first_job),
            wake: Condvar::new(),
            fetch_wake: Condvar::new(),
            stop: AtomicBool::new(false),
            total_jobs,
            // No further ahead than the run has jobs: the channel holds a place for each job ahead.
            ahead: prefetch.div_ceil(per_job).clamp(1, total_jobs.max(1)),
            hint_ahead: HINT_AHEAD.saturating_mul(self.threads),
            skip_corrupt: self.on_corrupt == OnCorrupt::Skip,
        });
        // Readers past one per job of the run would find nothing to read (and each has a place in the channel).
        let readers = self.threads.min(total_jobs.max(1));
        let (tx, rx) = crossbeam_channel::bounded(shared.ahead + readers.max(1));
        let mut loader = Loader {
            shared,
            rx,
            workers: Vec::new(),
            pending: BTreeMap::new(),
            current: Vec::new().into_iter(),
            next_job: first_job,
            resume_at: cursor,
            state,
            finished: false,
            corrupt: 0,
            prefetch,
        };
        // Named, so that a profiler or a stuck process shows whose threads these are. Where the system
        // starts no more, the loader is dropped, which stops and joins those already started.
        let fetchers = if loader.shared.readahead.is_some() { self.fetchers } else { 0 };
        for i in 0..readers.saturating_add(fetchers) {
            let (shared, tx) = (loader.shared.clone(), tx.clone());
            let started = if i < readers {
                std::thread::Builder::new()
                    .name(format!("cubeload-reader-{i}"))
                    .spawn(move || reader_loop(&shared, &tx))
            } else {
                std::thread::Builder::new()
                    .name(format!("cubeload-fetch-{}", i - readers))
                    .spawn(move || fetch_loop(&shared))
            };
            match started {
                Ok(handle) => loader.workers.push(handle),
                Err(source) => {
                    return Err(LoaderError::Threads {
                        asked: (readers, fetchers),
                        started: loader.workers.len(),
                        source,
                    });
                }
            }
        }
        Ok(loader)
    }
}

/// What the batches prefetched by default may hold, values and masks: readers wait whenever the consumer is
/// `prefetch` batches behind, and on a machine whose cores they keep busy the consumer runs late (it is
/// woken, then waits for a time slice). A few batches of pixel series are several milliseconds of work; as
/// few image-sequence batches of a few hundred KB were under one, and the readers waited a fifth of the time.
pub const PREFETCH_BYTES: usize = 32 << 20;

/// The least prefetch depth by default, however large the batches.
pub const MIN_PREFETCH: usize = 4;

/// The largest prefetch depth by default, however small the batches (the channel has a place for each).
pub const MAX_PREFETCH: usize = 1024;

/// The prefetch depth for batches of `batch_bytes`: as many as [`PREFETCH_BYTES`] hold, between
/// [`MIN_PREFETCH`] and [`MAX_PREFETCH`].
#[must_use]
pub fn default_prefetch(batch_bytes: usize) -> usize {
    (PREFETCH_BYTES / batch_bytes.max(1)).clamp(MIN_PREFETCH, MAX_PREFETCH)
}

/// A job's batches and the number of corrupt chunks left out of them.
type JobOutput = (Vec<Batch>, usize);
type JobResult = (usize, Result<JobOutput, LoaderError>);

/// Which jobs readers and fetchers take next.
struct Cursor {
    /// Next job a reader takes.
    next_read: usize,
    /// Next job a fetcher takes.
    next_fetch: usize,
    /// Jobs fetched and not yet taken by a reader.
    fetched: BTreeSet<usize>,
    /// Readers and fetchers waiting on their condition variables: a notification is a system call even when
    /// nobody waits, and the consumer would make two per batch.
    readers_waiting: usize,
    fetchers_waiting: usize,
}

struct Shared {
    assembler: Assembler,
    sampler: Sampler,
    seed: u64,
    /// Next jobs to read and to fetch (the lock `wake` and `fetch_wake` wait with).
    jobs: Mutex<Cursor>,
    /// In front of a slow store: what the fetchers read ahead.
    readahead: Option<Arc<ReadaheadStore>>,
    /// Jobs handed to the consumer so far (readers stay within `ahead` of it).
    delivered: AtomicUsize,
    /// Readers wait here: for the consumer to take a job, or for a job to be fetched.
    wake: Condvar,
    /// Fetchers wait here, for the consumer to take a job (which frees one place in the prefetch depth: one
    /// fetcher is woken, not all of them, which would be dozens of wake-ups per batch).
    fetch_wake: Condvar,
    stop: AtomicBool,
    total_jobs: usize,
    ahead: usize,
    /// Readers taking job `j` hint the kernel to read job `j + hint_ahead` ([`Assembler::hint`]).
    hint_ahead: usize,
    skip_corrupt: bool,
}

impl Shared {
    fn run_job(&self, job: usize) -> Result<JobOutput, LoaderError> {
        let job = self.sampler.job(job);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.assembler.job(self.seed, &job, self.skip_corrupt)
        }));
        result.unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default();
            Err(LoaderError::Panic(message))
        })
    }
}

/// How far ahead of the jobs being read the readers hint the kernel to read, in jobs per reader: far enough
/// that a hinted job's bytes are in memory when a reader takes it (two jobs' assembly per reader).
pub(crate) const HINT_AHEAD: usize = 2;

fn reader_loop(shared: &Shared, tx: &crossbeam_channel::Sender<JobResult>) {
    crate::source::quiet_hdf5_in_this_thread();
    loop {
        let job = {
            let mut jobs = shared.jobs.lock().expect("job counter");
            loop {
                let next = jobs.next_read;
                if shared.stop.load(Ordering::Acquire) || next >= shared.total_jobs {
                    return;
                }
                // Within the prefetch depth and, in front of a slow store, fetched.
                let fetched = shared.readahead.is_none() || jobs.fetched.remove(&next);
                if fetched && next < shared.delivered.load(Ordering::Acquire) + shared.ahead {
                    break;
                }
                if fetched {
                    jobs.fetched.insert(next);
                }
                jobs.readers_waiting += 1;
                jobs = shared.wake.wait(jobs).expect("job counter");
                jobs.readers_waiting -= 1;
            }
            jobs.next_read += 1;
            jobs.next_read - 1
        };
        let result = shared.run_job(job);
        if tx.send((job, result)).is_err() {
            return; // the loader was dropped
        }
        // After the job, not before: the hint may read a shard's index, which the first batch must not wait
        // for.
        if job + shared.hint_ahead < shared.total_jobs {
            shared.assembler.hint(&shared.sampler.job(job + shared.hint_ahead).chunks);
        }
    }
}

/// Fetches the store reads of upcoming jobs into the readahead store, within the prefetch depth. A read that
/// fails is left to the reader, which reports it.
fn fetch_loop(shared: &Shared) {
    let Some(readahead) = &shared.readahead else { return };
    let read = |key: &StoreKey, range: ByteRange| readahead.read_through(key, range);
    loop {
        let job = {
            let mut jobs = shared.jobs.lock().expect("job counter");
            loop {
                if shared.stop.load(Ordering::Acquire) || jobs.next_fetch >= shared.total_jobs {
                    return;
                }
                if jobs.next_fetch < shared.delivered.load(Ordering::Acquire) + shared.ahead {
                    break;
                }
                jobs.fetchers_waiting += 1;
                jobs = shared.fetch_wake.wait(jobs).expect("job counter");
                jobs.fetchers_waiting -= 1;
            }
            jobs.next_fetch += 1;
            jobs.next_fetch - 1
        };
        // The job's reads one after the other: concurrency comes from the number of fetch threads (a thread
        // per read costs more CPU than the waiting it saves). Whatever happens here, the job is marked
        // fetched: its reader must never wait forever.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let chunks = shared.sampler.job(job).chunks;
            for step in shared.assembler.planned_reads(&chunks, &read) {
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                match step {
                    Planned::Fetch(key, range) => {
                        let _ = readahead.fetch(&key, range);
                    }
                    Planned::Give(key, range, bytes) => readahead.deposit(&key, range, bytes),
                }
            }
        }));
        let readers_waiting = {
            let mut jobs = shared.jobs.lock().expect("job counter");
            jobs.fetched.insert(job);
            jobs.readers_waiting
        };
        if readers_waiting > 0 {
            shared.wake.notify_all();
        }
    }
}

/// An iterator of batches; see the module docs.
pub struct Loader {
    shared: Arc<Shared>,
    rx: crossbeam_channel::Receiver<JobResult>,
    workers: Vec<JoinHandle<()>>,
    pending: BTreeMap<usize, Result<JobOutput, LoaderError>>,
    current: std::vec::IntoIter<Batch>,
    next_job: usize,
    /// Cursor of the first batch to deliver in the first job (a resumed epoch's cursor), then 0.
    resume_at: usize,
    state: LoaderState,
    finished: bool,
    /// Corrupt chunks left out so far.
    corrupt: usize,
    /// Batches read ahead of the consumer at most.
    prefetch: usize,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader").field("state", &self.state).finish_non_exhaustive()
    }
}

impl Loader {
    /// Starts building a loader over the cube at `path`: a directory or `s3://bucket/prefix`.
    pub fn builder(path: impl AsRef<Path>) -> LoaderBuilder {
        LoaderBuilder {
            path: path.as_ref().to_path_buf(),
            variables: Vec::new(),
            seed: 0,
            shuffle: false,
            epochs: 1,
            prefetch: None,
            threads: 2,
            share: Share::ALL,
            mix: 1,
            transform: Transform::default(),
            min_valid: None,
            saved: None,
            given: Given::default(),
            on_corrupt: OnCorrupt::Error,
            store: None,
            fetchers: 32,
        }
    }

    /// Where the loader stands: build with [`LoaderBuilder::resume`] to continue after the last batch
    /// delivered.
    #[must_use]
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Batches left out so far under [`OnCorrupt::Skip`], each for a chunk it could not read (counted as their
    /// jobs are delivered).
    #[must_use]
    pub fn corrupt_chunks(&self) -> usize {
        self.corrupt
    }

    /// In front of a slow store: reads served from what the fetch threads fetched ahead, and reads that
    /// went to the store (shard indexes, level chunks, and what the fetchers had not fetched yet).
    #[must_use]
    pub fn prefetched_reads(&self) -> Option<(u64, u64)> {
        self.shared.readahead.as_ref().map(|r| r.hits_and_misses())
    }

    /// Batches the readers may hold ready ahead of the consumer: the one given to
    /// [`LoaderBuilder::prefetch`], or the default for this cube's batches ([`default_prefetch`]).
    #[must_use]
    pub fn prefetch_depth(&self) -> usize {
        self.prefetch
    }

    /// Batches per epoch of this loader's share: its rank's, and of that its worker's.
    #[must_use]
    pub fn batches_per_epoch(&self) -> usize {
        self.shared.sampler.per_epoch()
    }

    /// Stops the readers, as dropping the loader does, and returns the batches of the jobs they took (counted
    /// from the first epoch's first, delivered or read ahead; `mix` batches a job): what a measurement that
    /// stops early has read.
    pub(crate) fn stop(self) -> usize {
        let shared = self.shared.clone();
        drop(self);
        let jobs = shared.jobs.lock().expect("job counter").next_read;
        shared.sampler.batches_before(jobs)
    }

    /// The chunks of the first `n` batches of the first epoch (fewer if the epoch is shorter), in delivery
    /// order: what `cubeload bench` reads in a measurement that takes only part of an epoch.
    pub(crate) fn first_chunks(&self, n: usize) -> Vec<ChunkId> {
        self.shared.sampler.epoch_order(0).iter().take(n).copied().collect()
    }

    /// The cube's metadata.
    #[must_use]
    pub fn meta(&self) -> &CubeMeta {
        self.shared.assembler.meta()
    }

    /// Names along `V` and, when returned separately, of the static variables.
    #[must_use]
    pub fn variable_names(&self) -> (Vec<String>, Vec<String>) {
        self.shared.assembler.variable_names()
    }

    /// Names of every variable the loader reads, in the order asked, those delivered at their native
    /// resolution ([`Batch::native`]) included: the variables a resume asks for again.
    #[must_use]
    pub fn selected_variables(&self) -> Vec<String> {
        self.shared.assembler.selected_names()
    }

    /// The next job's batches, in order, from a reader thread or read here when there are none;
    /// [`TimedOut`] when the readers have not delivered it by `deadline`.
    fn next_job(
        &mut self,
        deadline: Option<std::time::Instant>,
    ) -> Result<Option<Result<JobOutput, LoaderError>>, TimedOut> {
        if self.next_job >= self.shared.total_jobs {
            return Ok(None);
        }
        let job = self.next_job;
        let result = if self.workers.is_empty() {
            self.shared.run_job(job)
        } else {
            loop {
                if let Some(result) = self.pending.remove(&job) {
                    break result;
                }
                let received = match deadline {
                    Some(deadline) => match self.rx.recv_deadline(deadline) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => return Err(TimedOut),
                        other => other.map_err(|_| ()),
                    },
                    None => self.rx.recv().map_err(|_| ()),
                };
                match received {
                    Ok((j, result)) => {
                        self.pending.insert(j, result);
                    }
                    Err(()) => break Err(LoaderError::Panic("all reader threads stopped".into())),
                }
            }
        };
        self.next_job += 1;
        self.shared.delivered.store(self.next_job, Ordering::Release);
        // Under the lock, so that a reader between its check and its wait cannot miss this notification: it
        // counts itself as waiting before it releases the lock.
        let jobs = self.shared.jobs.lock().expect("job counter");
        let waiting = (jobs.readers_waiting, jobs.fetchers_waiting);
        drop(jobs);
        if waiting.0 > 0 {
            self.shared.wake.notify_all();
        }
        if waiting.1 > 0 {
            self.shared.fetch_wake.notify_one();
        }
        Ok(Some(result))
    }

    /// The next batch, as [`Iterator::next`] gives it, waiting for it at most `timeout`: [`TimedOut`] when
    /// the readers have not made it by then, and nothing is lost (call again). A caller that must stay
    /// responsive while a slow store answers (Python's Ctrl-C) waits in slices. A loader without reader
    /// threads reads the batch itself, however long that takes.
    ///
    /// # Errors
    /// [`TimedOut`] when no batch came within `timeout`.
    pub fn next_within(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<Option<Result<Batch, LoaderError>>, TimedOut> {
        self.next_until(std::time::Instant::now().checked_add(timeout))
    }

    fn next_until(
        &mut self,
        deadline: Option<std::time::Instant>,
    ) -> Result<Option<Result<Batch, LoaderError>>, TimedOut> {
        if self.finished {
            return Ok(None);
        }
        loop {
            if let Some(batch) = self.current.next() {
                let per_epoch = self.shared.sampler.per_epoch();
                self.state.epoch = batch.origin.epoch;
                self.state.cursor = self.shared.sampler.cursor_of(batch.origin.position) + 1;
                if self.state.cursor == per_epoch {
                    self.state.epoch += 1;
                    self.state.cursor = 0;
                }
                return Ok(Some(Ok(batch)));
            }
            let Some(job) = self.next_job(deadline)? else { return Ok(None) };
            match job {
                Ok((mut batches, corrupt)) => {
                    self.corrupt += corrupt;
                    // By position, not by count: a skipped corrupt chunk leaves a gap in the job.
                    let resume_at = std::mem::take(&mut self.resume_at);
                    let sampler = &self.shared.sampler;
                    batches.retain(|b| sampler.cursor_of(b.origin.position) >= resume_at);
                    self.current = batches.into_iter();
                }
                Err(e) => {
                    // An error ends the stream: later batches would no longer match the state.
                    self.finished = true;
                    return Ok(Some(Err(e)));
                }
            }
        }
    }
}

/// No batch came within the time a caller of [`Loader::next_within`] gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no batch within the time given")]
pub struct TimedOut;

impl Iterator for Loader {
    type Item = Result<Batch, LoaderError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_until(None).unwrap_or_else(|TimedOut| unreachable!("no deadline"))
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        drop(self.shared.jobs.lock().expect("job counter"));
        self.shared.wake.notify_all();
        self.shared.fetch_wake.notify_all();
        // Unblock readers waiting to send by dropping the receiver's backlog first.
        while self.rx.try_recv().is_ok() {}
        let rx = std::mem::replace(&mut self.rx, crossbeam_channel::never());
        drop(rx);
        // Readers stop after the chunk they are decoding; one still waiting on its store after
        // `DROP_GRACE` (a stalled object store, a read that never returns) is left to end on its own, so
        // that dropping a loader, and the process exiting after Ctrl-C, never hangs on the store. It holds
        // what it reads from (`Shared`), not the loader.
        let deadline = std::time::Instant::now() + DROP_GRACE;
        let mut pause = std::time::Duration::from_micros(50);
        while self.workers.iter().any(|w| !w.is_finished()) && std::time::Instant::now() < deadline {
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(20));
        }
        for worker in self.workers.drain(..) {
            if worker.is_finished() {
                let _ = worker.join();
            }
        }
    }
}

/// How long dropping a [`Loader`] waits for its threads before leaving those still reading to end alone.
pub const DROP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
