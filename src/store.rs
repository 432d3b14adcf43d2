//! Where cubes live: a local directory, or `s3://bucket/prefix` on an S3-compatible object store.
//!
//! Readers see one [`ReadableStorage`] whatever the location, so the loader, `info` and `quicklook` work on
//! both. Object stores are reached through zarrs' `object_store` support (async), driven from the loader's
//! plain threads by one shared tokio runtime; credentials, region and endpoint come from the standard AWS
//! environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
//! `AWS_ALLOW_HTTP` for a plain-HTTP endpoint).
//!
//! Generation writes locally first (resumable, verifiable) and then uploads the finished cube with its root
//! metadata, the completion marker, last: a reader never sees a partial cube as complete.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use zarrs::filesystem::FilesystemStore;
use zarrs::storage::byte_range::{ByteRange, ByteRangeIterator};
use zarrs::storage::{
    MaybeBytes, MaybeBytesIterator, ReadableStorage, ReadableStorageTraits, StorageError, StoreKey,
};

use crate::cube::CubeError;

/// Where a cube is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory.
    Local(PathBuf),
    /// `s3://bucket/prefix`.
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix of the cube inside it (no leading or trailing `/`).
        prefix: String,
    },
}

impl Location {
    /// `s3://bucket/prefix` for an object store, anything else for a directory.
    #[must_use]
    pub fn parse(path: &Path) -> Location {
        let text = path.to_string_lossy();
        match text.strip_prefix("s3://") {
            Some(rest) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                Location::S3 { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() }
            }
            None => Location::Local(path.to_path_buf()),
        }
    }

    /// The location as users write it, for messages.
    #[must_use]
    pub fn display_path(&self) -> PathBuf {
        match self {
            Location::Local(path) => path.clone(),
            Location::S3 { bucket, prefix } => PathBuf::from(format!("s3://{bucket}/{prefix}")),
        }
    }

    /// The store, for reading.
    ///
    /// # Errors
    /// [`CubeError::Zarr`] when the store cannot be set up (bad URL, missing credentials, a build without
    /// the `s3` feature).
    pub fn readable(&self) -> Result<ReadableStorage, CubeError> {
        match self {
            Location::Local(path) => Ok(Arc::new(
                FilesystemStore::new(path)
                    .map_err(|e| CubeError::Zarr { path: path.clone(), message: e.to_string() })?,
            )),
            Location::S3 { .. } => object_store::readable(self),
        }
    }
}

/// Uploads the complete cube in directory `dir` to `location` (an object store), the root metadata last.
/// An earlier cubeload cube there is replaced when `replace` (its root metadata removed first, its objects
/// that the new cube does not have removed before the new root is written), refused otherwise; so are
/// objects left under the cube's nodes by an upload that did not finish. Objects under the URL but outside
/// the cube's nodes are left alone. An object store cannot rename: while a cube is replaced, and after a
/// replacement that failed, there is no cube at `location` (readers refuse it), not the earlier one.
///
/// # Errors
/// [`CubeError::OutputTaken`] when a cube or an unfinished upload's objects are there and `replace` is
/// false, or a Zarr store that cubeload did not make is there; [`CubeError::Zarr`] when a request fails
/// (the remote cube then has no root metadata: readers see no cube).
pub fn upload(dir: &Path, location: &Location, replace: bool) -> Result<(), CubeError> {
    object_store::upload(dir, location, replace)
}

/// Whether [`upload`] to `location` (an object store) could replace what is there: nothing, or a cubeload
/// cube when `replace`. Checked before a cube is made for it, so that a refusal comes first.
///
/// # Errors
/// [`CubeError::OutputTaken`] as [`upload`] refuses; [`CubeError::Zarr`] when the store cannot be reached.
pub fn check_replaceable(location: &Location, replace: bool) -> Result<(), CubeError> {
    object_store::check_replaceable(location, replace)
}

/// Whether a cube (a root `zarr.json`) exists at `location`.
///
/// # Errors
/// [`CubeError::Zarr`] when the store cannot be reached.
pub fn exists(location: &Location) -> Result<bool, CubeError> {
    match location {
        Location::Local(path) => Ok(path.join("zarr.json").is_file()),
        Location::S3 { .. } => {
            let store = location.readable()?;
            let key = StoreKey::new("zarr.json").expect("valid key");
            store
                .size_key(&key)
                .map(|size| size.is_some())
                .map_err(|e| CubeError::Zarr { path: location.display_path(), message: e.to_string() })
        }
    }
}

#[cfg(feature = "s3")]
mod object_store {
    use std::collections::{BTreeSet, HashSet};
    use std::path::Path;
    use std::sync::{Arc, OnceLock};

    use zarrs::storage::storage_adapter::async_to_sync::{AsyncToSyncBlockOn, AsyncToSyncStorageAdapter};
    use zarrs::storage::{
        ListableStorageTraits, ReadableStorage, ReadableStorageTraits, StorePrefix, WritableStorageTraits,
    };
    use zarrs_object_store::AsyncObjectStore;
    use zarrs_object_store::object_store::aws::AmazonS3Builder;
    use zarrs_object_store::object_store::prefix::PrefixStore;

    use super::{CubeError, Location, StoreKey};

    /// One runtime for every object-store request of the process (its threads only wait on sockets).
    fn runtime() -> &'static tokio::runtime::Runtime {
        static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
        RUNTIME.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("cubeload-io")
                .enable_all()
                .build()
                .expect("a tokio runtime")
        })
    }

    struct BlockOn(tokio::runtime::Handle);

    impl AsyncToSyncBlockOn for BlockOn {
        fn block_on<F: core::future::Future>(&self, future: F) -> F::Output {
            self.0.block_on(future)
        }
    }

    type Store = AsyncToSyncStorageAdapter<
        AsyncObjectStore<PrefixStore<zarrs_object_store::object_store::aws::AmazonS3>>,
        BlockOn,
    >;

    fn store(location: &Location) -> Result<Arc<Store>, CubeError> {
        let Location::S3 { bucket, prefix } = location else { unreachable!("only called for object stores") };
        let fail = |message: String| CubeError::Zarr { path: location.display_path(), message };
        let s3 = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| fail(format!("cannot set up the S3 client (AWS_* environment variables): {e}")))?;
        let store = AsyncObjectStore::new(PrefixStore::new(s3, prefix.as_str()));
        Ok(Arc::new(AsyncToSyncStorageAdapter::new(Arc::new(store), BlockOn(runtime().handle().clone()))))
    }

    pub(super) fn readable(location: &Location) -> Result<ReadableStorage, CubeError> {
        Ok(store(location)?)
    }

    pub(super) fn upload(dir: &Path, location: &Location, replace: bool) -> Result<(), CubeError> {
        let store = store(location)?;
        let url = location.display_path();
        let fail = |e: &dyn std::fmt::Display| CubeError::Zarr { path: url.clone(), message: e.to_string() };
        let taken = |message: String| CubeError::OutputTaken { path: url.clone(), message };
        let root = StoreKey::new("zarr.json").expect("valid key");
        let mut files = Vec::new();
        collect(dir, dir, &mut files)?;
        let uploaded: HashSet<&str> = files.iter().map(|(key, _)| key.as_str()).collect();
        // The cube's objects lie under its nodes (`t2m/`, `time/`, ...): the new cube's, and the earlier
        // cube's when one is replaced. Nothing else under the URL is touched.
        let mut nodes = top_level(uploaded.iter().copied());
        let earlier = earlier_cube(&store, location, replace)?;
        nodes.extend(earlier.iter().flatten().cloned());
        // Objects under those nodes that the new cube does not have: the earlier cube's, or those of an
        // upload that stopped before its root metadata. Left there, they would be read as the new cube's
        // chunks that are not stored (all fill value).
        let mut stale = Vec::new();
        for node in &nodes {
            let prefix = StorePrefix::new(format!("{node}/")).map_err(|e| fail(&e))?;
            let keys = store.list_prefix(&prefix).map_err(|e| fail(&e))?;
            stale.extend(keys.into_iter().filter(|key| !uploaded.contains(key.as_str())));
        }
        if !replace && let Some(first) = stale.first() {
            return Err(taken(format!(
                "{} objects of an upload that did not finish are here (such as {first}); pass --overwrite to \
                 replace them",
                stale.len()
            )));
        }
        if earlier.is_some() {
            // The root first: from here on readers see no cube rather than a mix of two.
            store.erase(&root).map_err(|e| fail(&e))?;
        }
        for (key, path) in files.iter().filter(|(key, _)| *key != root) {
            let bytes = std::fs::read(path).map_err(|source| CubeError::Io { path: path.clone(), source })?;
            store.set(key, bytes.into()).map_err(|e| fail(&e))?;
        }
        store.erase_many(&stale).map_err(|e| fail(&e))?;
        let bytes = std::fs::read(dir.join("zarr.json"))
            .map_err(|source| CubeError::Io { path: dir.join("zarr.json"), source })?;
        store.set(&root, bytes.into()).map_err(|e| fail(&e))
    }

    pub(super) fn check_replaceable(location: &Location, replace: bool) -> Result<(), CubeError> {
        earlier_cube(store(location)?.as_ref(), location, replace).map(drop)
    }

    /// The top-level nodes of the cube at `location` that an upload would replace (`None`: no cube there).
    fn earlier_cube(
        store: &Store,
        location: &Location,
        replace: bool,
    ) -> Result<Option<BTreeSet<String>>, CubeError> {
        let url = location.display_path();
        let root = StoreKey::new("zarr.json").expect("valid key");
        let Some(earlier) =
            store.get(&root).map_err(|e| CubeError::Zarr { path: url.clone(), message: e.to_string() })?
        else {
            return Ok(None);
        };
        let taken =
            |message: &str| CubeError::OutputTaken { path: url.clone(), message: message.to_string() };
        if !replace {
            return Err(taken("a cube already exists here; pass --overwrite to replace it"));
        }
        cube_nodes(&earlier).map(Some).ok_or_else(|| {
            taken(
                "a Zarr store that cubeload did not make is here; cubeload replaces only its own cubes: choose \
                 another URL or remove it",
            )
        })
    }

    /// The first parts of `keys` that have more than one (`t2m` of `t2m/c/0/0/0`).
    fn top_level<'a>(keys: impl Iterator<Item = &'a str>) -> BTreeSet<String> {
        keys.filter_map(|key| key.split_once('/')).map(|(node, _)| node.to_string()).collect()
    }

    /// The top-level nodes of the cubeload cube whose root metadata is `root` (from its consolidated
    /// metadata); `None` when it is not a cubeload cube.
    fn cube_nodes(root: &[u8]) -> Option<BTreeSet<String>> {
        let root: serde_json::Value = serde_json::from_slice(root).ok()?;
        root.get("attributes")?.get("cubeload")?;
        let nodes = root.get("consolidated_metadata")?.get("metadata")?.as_object()?;
        Some(nodes.keys().map(|name| name.split('/').next().unwrap_or(name).to_string()).collect())
    }

    /// Every file under `dir` with its store key.
    fn collect(
        root: &Path,
        dir: &Path,
        out: &mut Vec<(StoreKey, std::path::PathBuf)>,
    ) -> Result<(), CubeError> {
        let io = |source| CubeError::Io { path: dir.to_path_buf(), source };
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.is_dir() {
                collect(root, &path, out)?;
            } else {
                let rel = path.strip_prefix(root).expect("under root").to_string_lossy().replace('\\', "/");
                let key = StoreKey::new(rel.clone())
                    .map_err(|e| CubeError::Zarr { path: path.clone(), message: e.to_string() })?;
                out.push((key, path));
            }
        }
        Ok(())
    }
}

#[cfg(not(feature = "s3"))]
mod object_store {
    use std::path::Path;

    use zarrs::storage::ReadableStorage;

    use super::{CubeError, Location};

    fn unsupported(location: &Location) -> CubeError {
        CubeError::Zarr {
            path: location.display_path(),
            message: "object stores need cubeload built with the `s3` feature".to_string(),
        }
    }

    pub(super) fn readable(location: &Location) -> Result<ReadableStorage, CubeError> {
        Err(unsupported(location))
    }

    pub(super) fn upload(_: &Path, location: &Location, _: bool) -> Result<(), CubeError> {
        Err(unsupported(location))
    }

    pub(super) fn check_replaceable(location: &Location, _: bool) -> Result<(), CubeError> {
        Err(unsupported(location))
    }
}

/// Reads fetched ahead of time, in front of a slow store (an object store). The loader's fetch threads put
/// here the bytes of the chunks of upcoming batches, many requests in flight at once, and its reader
/// threads, which decode on the cores, then take them without waiting: latency is paid by threads that
/// only wait, CPU by as many threads as there are cores. A fetched read is taken once; anything not fetched
/// (a shard index, a level chunk) goes to the store. At most `capacity` reads are kept (oldest out).
pub struct ReadaheadStore {
    inner: ReadableStorage,
    capacity: AtomicU64,
    fetched: std::sync::Mutex<Fetched>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// A byte range as a map key.
type RangeKey = (bool, u64, Option<u64>);

fn range_key(range: ByteRange) -> RangeKey {
    match range {
        ByteRange::FromStart(offset, length) => (false, offset, length),
        ByteRange::Suffix(length) => (true, length, None),
    }
}

#[derive(Default)]
struct Fetched {
    /// Copies kept, oldest first: the same read may be fetched for several batches in flight.
    reads: std::collections::HashMap<(StoreKey, RangeKey), std::collections::VecDeque<zarrs::storage::Bytes>>,
    order: std::collections::VecDeque<(StoreKey, RangeKey)>,
    sizes: std::collections::HashMap<StoreKey, Option<u64>>,
}

impl Fetched {
    /// Removes and returns the oldest copy of `id`.
    fn forget_oldest(&mut self, id: &(StoreKey, RangeKey)) -> Option<zarrs::storage::Bytes> {
        let copies = self.reads.get_mut(id)?;
        let bytes = copies.pop_front();
        if copies.is_empty() {
            self.reads.remove(id);
        }
        bytes
    }
}

impl ReadaheadStore {
    /// Wraps `inner`, keeping at most `capacity` fetched reads.
    #[must_use]
    pub fn new(inner: ReadableStorage, capacity: usize) -> Self {
        ReadaheadStore {
            inner,
            capacity: AtomicU64::new(capacity.max(1) as u64),
            fetched: std::sync::Mutex::new(Fetched::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Keeps at most `capacity` fetched reads from now on.
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity.max(1) as u64, Ordering::Relaxed);
    }

    /// Reads `range` of `key` from the store now, for a later reader.
    ///
    /// # Errors
    /// The store's error (the reader then asks the store itself, and reports what it gets).
    pub fn fetch(&self, key: &StoreKey, range: ByteRange) -> Result<(), StorageError> {
        if let Some(bytes) = self.inner.get_partial(key, range)? {
            self.deposit(key, range, bytes);
        }
        Ok(())
    }

    /// Keeps `bytes` as what the store holds at `range` of `key`, for a later reader (a shard index the
    /// fetch threads already hold, given to every reader of a chunk of its shard).
    pub fn deposit(&self, key: &StoreKey, range: ByteRange, bytes: zarrs::storage::Bytes) {
        let mut fetched = self.lock();
        let id = (key.clone(), range_key(range));
        fetched.reads.entry(id.clone()).or_default().push_back(bytes);
        fetched.order.push_back(id);
        while fetched.order.len() as u64 > self.capacity.load(Ordering::Relaxed) {
            let old = fetched.order.pop_front().expect("non-empty");
            fetched.forget_oldest(&old);
        }
    }

    /// Reads `range` of `key` from the store, keeping nothing.
    ///
    /// # Errors
    /// The store's error.
    pub fn read_through(&self, key: &StoreKey, range: ByteRange) -> Result<MaybeBytes, StorageError> {
        self.inner.get_partial(key, range)
    }

    /// Reads served from what was fetched, and reads that went to the store.
    #[must_use]
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    /// Takes the fetched bytes of every range, or none.
    fn take(&self, key: &StoreKey, ranges: &[ByteRange]) -> Option<Vec<zarrs::storage::Bytes>> {
        let mut fetched = self.lock();
        let ids: Vec<(StoreKey, RangeKey)> = ranges.iter().map(|&r| (key.clone(), range_key(r))).collect();
        if !ids.iter().all(|id| fetched.reads.contains_key(id)) {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        let mut taken: Vec<zarrs::storage::Bytes> = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let Some(bytes) = fetched.forget_oldest(id) else {
                // The same range asked twice in one request (its one copy already taken): the same bytes.
                let first = ids.iter().position(|other| other == id).expect("an earlier occurrence");
                debug_assert!(first < i);
                taken.push(taken[first].clone());
                continue;
            };
            if let Some(at) = fetched.order.iter().position(|o| o == id) {
                fetched.order.remove(at);
            }
            taken.push(bytes);
        }
        Some(taken)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fetched> {
        self.fetched.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ReadableStorageTraits for ReadaheadStore {
    fn get(&self, key: &StoreKey) -> Result<MaybeBytes, StorageError> {
        match self.take(key, &[ByteRange::FromStart(0, None)]) {
            Some(mut bytes) => Ok(bytes.pop()),
            None => self.inner.get(key),
        }
    }

    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        let ranges: Vec<ByteRange> = byte_ranges.collect();
        match self.take(key, &ranges) {
            Some(bytes) => Ok(Some(Box::new(bytes.into_iter().map(Ok)))),
            None => self.inner.get_partial_many(key, Box::new(ranges.into_iter())),
        }
    }

    fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
        // A complete cube does not change under its readers: each size is asked of the store once.
        if let Some(size) = self.lock().sizes.get(key) {
            return Ok(*size);
        }
        let size = self.inner.size_key(key)?;
        self.lock().sizes.insert(key.clone(), size);
        Ok(size)
    }

    fn supports_get_partial(&self) -> bool {
        self.inner.supports_get_partial()
    }
}

/// A store that answers every request after a fixed delay: an object store's latency, reproducibly, for
/// measuring how well prefetching hides it.
pub struct LatencyStore {
    inner: ReadableStorage,
    delay: Duration,
    requests: AtomicU64,
}

impl LatencyStore {
    /// Wraps `inner`, adding `delay` to each request.
    #[must_use]
    pub fn new(inner: ReadableStorage, delay: Duration) -> Self {
        LatencyStore { inner, delay, requests: AtomicU64::new(0) }
    }

    /// Requests answered so far.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn wait(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(self.delay);
    }
}

impl ReadableStorageTraits for LatencyStore {
    fn get(&self, key: &StoreKey) -> Result<MaybeBytes, StorageError> {
        self.wait();
        self.inner.get(key)
    }

    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        self.wait();
        self.inner.get_partial_many(key, byte_ranges)
    }

    fn get_partial(&self, key: &StoreKey, byte_range: ByteRange) -> Result<MaybeBytes, StorageError> {
        self.wait();
        self.inner.get_partial(key, byte_range)
    }

    fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
        self.wait();
        self.inner.size_key(key)
    }

    fn supports_get_partial(&self) -> bool {
        self.inner.supports_get_partial()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readahead_serves_each_fetched_copy_once_and_repeated_ranges_alike() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"0123456789").unwrap();
        let inner: ReadableStorage = Arc::new(FilesystemStore::new(dir.path()).unwrap());
        let store = ReadaheadStore::new(inner, 16);
        let key = StoreKey::new("a").unwrap();
        let (r1, r2) = (ByteRange::FromStart(0, Some(2)), ByteRange::FromStart(5, Some(3)));
        store.fetch(&key, r1).unwrap();
        store.fetch(&key, r2).unwrap();
        // [r1, r2, r1] with one copy of r1: the repeated range gets r1's bytes, not the previous range's.
        let got: Vec<Vec<u8>> = store
            .get_partial_many(&key, Box::new([r1, r2, r1].into_iter()))
            .unwrap()
            .unwrap()
            .map(|b| b.unwrap().to_vec())
            .collect();
        assert_eq!(got, [b"01".to_vec(), b"567".to_vec(), b"01".to_vec()]);
        assert_eq!(store.hits_and_misses(), (1, 0));
        // Taken once: the next read goes to the store (same bytes).
        assert_eq!(store.get_partial(&key, r1).unwrap().unwrap().to_vec(), b"01");
        assert_eq!(store.hits_and_misses(), (1, 1));
        // Fetched for two batches in flight: served twice, then gone.
        store.fetch(&key, r1).unwrap();
        store.fetch(&key, r1).unwrap();
        for _ in 0..3 {
            assert_eq!(store.get_partial(&key, r1).unwrap().unwrap().to_vec(), b"01");
        }
        assert_eq!(store.hits_and_misses(), (3, 2));
    }
}
