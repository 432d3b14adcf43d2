//! Where cubes live: a local directory, or `s3://bucket/prefix` on an S3-compatible object store.
//!
//! Readers see one [`ReadableStorage`] whatever the location, so the loader, `info` and `quicklook` work on
//! both. Object stores are reached through the `object_store` crate (async), driven from the loader's plain
//! threads by one shared tokio runtime; credentials, region and endpoint come from the standard AWS
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

/// Why `path` is no place for a cube, when it is a URL of a scheme other than `s3://` (`gs://`, `az://`,
/// `file://`, `S3://`, `s3:/x`): read as a directory, it would be a local folder named `gs:`.
#[must_use]
pub fn unsupported_url(path: &Path) -> Option<String> {
    let text = path.to_string_lossy();
    if text.starts_with("s3://") {
        return None;
    }
    let (scheme, _) = text.split_once(":/")?;
    let is_scheme = scheme.len() >= 2
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !is_scheme {
        return None;
    }
    let hint =
        if scheme.eq_ignore_ascii_case("s3") { " (an S3 URL is written s3://BUCKET/PREFIX)" } else { "" };
    Some(format!(
        "cubes live in a local directory or at s3://BUCKET/PREFIX; `{scheme}:` URLs are not supported{hint}"
    ))
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

    /// The store for reading and, on an object store, what tells whether the cube read is gone since
    /// ([`Gone`]): its reads then take only objects written before the cube's root metadata, or check that
    /// the cube is still the one opened.
    ///
    /// # Errors
    /// As [`Location::readable`].
    pub(crate) fn readable_watched(&self) -> Result<(ReadableStorage, Option<Arc<dyn Gone>>), CubeError> {
        match self {
            Location::Local(_) => Ok((self.readable()?, None)),
            Location::S3 { .. } => {
                object_store::readable_watched(self).map(|(store, gone)| (store, Some(gone)))
            }
        }
    }
}

/// Whether the cube a reader opened is gone: its local directory deleted, or, on an object store, its root
/// metadata removed or replaced (an upload replacing a cube removes the old root first and writes the new
/// one last). A read that fails is blamed on the cube's replacement only where this says so.
pub trait Gone: Send + Sync + std::fmt::Debug {
    /// Whether the cube opened is still there, gone, or behind a store that does not answer (an object store
    /// out of reach: a read that failed is then blamed on the store, not on a damaged chunk).
    fn check(&self) -> Presence;
}

/// What [`Gone::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// The cube opened is there.
    There,
    /// It was deleted or replaced.
    Gone,
    /// Its store does not answer.
    Unreachable,
}

impl Gone for PinnedDir {
    fn check(&self) -> Presence {
        if self.deleted() { Presence::Gone } else { Presence::There }
    }
}

/// A local cube's directory held open, and a path that reaches it through that handle
/// (`/proc/self/fd/N`): reads by that path stay in the directory opened wherever it is renamed, and fail once
/// it is deleted, instead of reading the files of a cube put in its place (`gen --overwrite` renames the old
/// cube aside, then deletes it). Where `/proc` is not mounted, the path is the directory's own.
#[derive(Debug)]
pub struct PinnedDir {
    handle: std::fs::File,
    path: PathBuf,
}

impl PinnedDir {
    /// The directory `dir` held open; `None` when it cannot be opened (missing: the caller says why).
    pub(crate) fn open(dir: &Path) -> Option<Arc<PinnedDir>> {
        use std::os::fd::AsRawFd as _;
        let handle = std::fs::File::open(dir).ok()?;
        if !handle.metadata().is_ok_and(|m| m.is_dir()) {
            return None;
        }
        let through = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
        let path = if through.is_dir() { through } else { dir.to_path_buf() };
        Some(Arc::new(PinnedDir { handle, path }))
    }

    /// Whether the directory opened has been deleted (a directory removed has no links left).
    #[must_use]
    pub fn deleted(&self) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        self.handle.metadata().is_ok_and(|m| m.nlink() == 0)
    }

    /// The path that reads the directory opened.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A store reading the directory opened, which keeps it open as long as it lives.
    pub(crate) fn store(self: &Arc<Self>) -> Result<ReadableStorage, CubeError> {
        let inner = FilesystemStore::new(&self.path)
            .map_err(|e| CubeError::Zarr { path: self.path.clone(), message: e.to_string() })?;
        let dir = self.clone();
        // Nothing to do before a read: the closure holds the directory open.
        let before = move || {
            let _ = &dir;
        };
        Ok(Arc::new(Hooked { inner: Arc::new(inner), before }))
    }
}

/// The reads of `inner`, each after `before()`; what `before` captures lives as long as the store.
struct Hooked<F> {
    inner: ReadableStorage,
    before: F,
}

impl<F: Fn() + Send + Sync> ReadableStorageTraits for Hooked<F> {
    fn get(&self, key: &StoreKey) -> Result<MaybeBytes, StorageError> {
        (self.before)();
        self.inner.get(key)
    }

    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        (self.before)();
        self.inner.get_partial_many(key, byte_ranges)
    }

    fn get_partial(&self, key: &StoreKey, byte_range: ByteRange) -> Result<MaybeBytes, StorageError> {
        (self.before)();
        self.inner.get_partial(key, byte_range)
    }

    fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
        (self.before)();
        self.inner.size_key(key)
    }

    fn supports_get_partial(&self) -> bool {
        self.inner.supports_get_partial()
    }
}

/// Uploads the complete cube in directory `dir` to `location` (an object store), the root metadata last.
///
/// Only what cubeload owns is replaced: a cubeload cube (its root metadata, the objects under the nodes that
/// root lists, its manifest), or what an upload that did not finish left (the objects its journal names).
/// Anything else under the URL refuses the upload, `replace` or not: its objects would be erased, or mixed
/// into the new cube. A cube is replaced only when `replace`; so are the leftovers of another cube's upload
/// (those of an upload with this `fingerprint` are this upload's, resumed). The upload first writes its
/// journal, naming every object it may leave (those it found and the new cube's), so that a run stopped
/// anywhere can be finished by the next; then it removes the earlier root (readers see no cube from then
/// on: an object store cannot rename), then every object found that the new cube does not have (before the
/// new cube's, so that a retry still knows them), then uploads the cube, its root last, and removes the
/// journal.
///
/// # Errors
/// [`CubeError::OutputTaken`] when something cubeload does not own is there, or a cube or another cube's
/// unfinished upload is there and `replace` is false; [`CubeError::Zarr`] when a request fails (the remote
/// cube then has no root metadata: readers see no cube; the next upload to the URL finishes the job).
pub fn upload(dir: &Path, location: &Location, replace: bool, fingerprint: &str) -> Result<(), CubeError> {
    object_store::upload(dir, location, replace, fingerprint)
}

/// Whether [`upload`] to `location` (an object store) of the cube of `fingerprint` would be refused, and
/// whether the bucket exists and these credentials may write and delete there (a small object,
/// `cubeload_probe`, is written and removed). Checked before a cube is made for it, so that a refusal
/// comes before hours of generation, not after.
///
/// # Errors
/// [`CubeError::OutputTaken`] as [`upload`] refuses; [`CubeError::Zarr`] when the store cannot be reached,
/// the bucket does not exist or the credentials may not write there.
pub fn check_replaceable(location: &Location, replace: bool, fingerprint: &str) -> Result<(), CubeError> {
    object_store::check_replaceable(location, replace, fingerprint)
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
            let found = store
                .size_key(&key)
                .map(|size| size.is_some())
                .map_err(|e| CubeError::Zarr { path: location.display_path(), message: e.to_string() })?;
            // A missing bucket answers as a missing object does: said, rather than "no such cube".
            if !found && let Some(message) = object_store::missing_bucket(location)? {
                return Err(CubeError::Zarr { path: location.display_path(), message });
            }
            Ok(found)
        }
    }
}

/// Bytes of the files under `dir` (0 for what cannot be read).
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    dir_bytes_and_files(dir).0
}

/// Bytes and number of the files under `dir` (nothing for what cannot be read).
pub(crate) fn dir_bytes_and_files(dir: &Path) -> (u64, u64) {
    std::fs::read_dir(dir).map_or((0, 0), |entries| {
        entries.filter_map(Result::ok).fold((0, 0), |(bytes, files), e| {
            let (b, f) = if e.path().is_dir() {
                dir_bytes_and_files(&e.path())
            } else {
                (e.metadata().map_or(0, |m| m.len()), 1)
            };
            (bytes + b, files + f)
        })
    })
}

/// Every node (array or group) of the cubeload cube whose root metadata is `root`, by path (`t2m`,
/// `coarse_5/t2m`); `None` when it is not a cubeload cube.
#[must_use]
pub fn cube_node_paths(root: &[u8]) -> Option<std::collections::BTreeSet<String>> {
    let root: serde_json::Value = serde_json::from_slice(root).ok()?;
    root.get("attributes")?.get("cubeload")?;
    let nodes = root.get("consolidated_metadata")?.get("metadata")?.as_object()?;
    Some(nodes.keys().cloned().collect())
}

#[cfg(feature = "s3")]
mod object_store {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::{Arc, OnceLock};

    use zarrs::storage::byte_range::{ByteRange, ByteRangeIterator};
    use zarrs::storage::storage_adapter::async_to_sync::{AsyncToSyncBlockOn, AsyncToSyncStorageAdapter};
    use zarrs::storage::{
        Bytes, ListableStorageTraits, MaybeBytesIterator, ReadableStorage, ReadableStorageTraits,
        StorageError,
    };
    use zarrs_object_store::AsyncObjectStore;
    use zarrs_object_store::object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
    use zarrs_object_store::object_store::path::Path as ObjectPath;
    use zarrs_object_store::object_store::prefix::PrefixStore;
    use zarrs_object_store::object_store::{
        ClientConfigKey, Error as ObjectError, GetOptions, GetRange, OBJECT_STORE_COALESCE_DEFAULT,
        ObjectMeta, ObjectStore, ObjectStoreExt, coalesce_ranges,
    };

    use chrono::{DateTime, Utc};

    use super::{CubeError, Location, StoreKey, cube_node_paths};
    use crate::cube::manifest::MANIFEST_FILE;

    /// The root metadata: written last, it makes the cube.
    const ROOT: &str = "zarr.json";
    /// An upload's journal, written first and removed last: the objects the upload may leave under the URL.
    const JOURNAL: &str = "cubeload_upload.json";
    /// Written and removed before a cube is made for the URL, to learn then whether the upload could write.
    const PROBE: &str = "cubeload_probe";

    /// One runtime for every object-store request of the process (its threads only wait on sockets), and the
    /// process that built it. A forked child (a `DataLoader` worker) inherits the parent's runtime without its
    /// threads, and would wait forever on its first request: it builds its own, leaving the inherited one
    /// alone (dropping it would wait for threads the child does not have).
    fn runtime() -> &'static tokio::runtime::Runtime {
        use std::sync::atomic::{AtomicPtr, Ordering};
        static RUNTIME: AtomicPtr<(u32, tokio::runtime::Runtime)> = AtomicPtr::new(std::ptr::null_mut());
        let pid = std::process::id();
        let current = RUNTIME.load(Ordering::Acquire);
        // SAFETY: a non-null pointer is one of the boxes leaked below, never freed.
        if let Some((built_by, runtime)) = unsafe { current.as_ref() }
            && *built_by == pid
        {
            return runtime;
        }
        let fresh = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cubeload-io")
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let built = Box::into_raw(Box::new((pid, fresh)));
        if RUNTIME.compare_exchange(current, built, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // SAFETY: `built` was leaked just above and is never freed.
            return &unsafe { &*built }.1;
        }
        // Another thread of this process built one first: that one serves, this one ends.
        // SAFETY: `built` was never shared: it is still this thread's box.
        let (_, mine) = *unsafe { Box::from_raw(built) };
        mine.shutdown_background();
        runtime()
    }

    fn block_on<F: core::future::Future>(future: F) -> F::Output {
        runtime().handle().block_on(future)
    }

    struct BlockOn;

    impl AsyncToSyncBlockOn for BlockOn {
        fn block_on<F: core::future::Future>(&self, future: F) -> F::Output {
            block_on(future)
        }
    }

    /// Adds to an object store's error what the user can do about it: the store's own messages name
    /// neither the bucket nor the environment variables.
    #[derive(Debug, Clone, Default)]
    struct Explain {
        bucket: String,
        /// Whether credentials were configured (`AWS_ACCESS_KEY_ID`, a web identity or container token):
        /// without them the client asks the instance metadata service, silently, and its failure names
        /// neither.
        credentials: bool,
    }

    impl Explain {
        fn message(&self, e: &dyn std::fmt::Display) -> String {
            let message = e.to_string();
            if message.contains("NoSuchBucket") {
                format!(
                    "{message}; the bucket `{}` does not exist at this endpoint (AWS_ENDPOINT_URL, AWS_REGION)",
                    self.bucket
                )
            } else if !self.credentials {
                // Whatever failed, the credentials from the metadata service are the likely cause, and the
                // fix the user may not know.
                format!(
                    "{message}; no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are set, so credentials were asked \
                     of the cloud instance's metadata service: set them, or run where that service has some"
                )
            } else if ["403 Forbidden", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"]
                .iter()
                .any(|code| message.contains(code))
            {
                format!(
                    "{message}; the store refused the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or \
                     their permission to do this in bucket `{}`",
                    self.bucket
                )
            } else {
                message
            }
        }
    }

    /// Whether an `AWS_*` boolean setting says yes, as `object_store` parses it.
    fn yes(value: Option<String>) -> bool {
        value.is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "on" | "yes" | "y"))
    }

    /// The cube's prefix in its bucket, with what explains failed requests.
    struct S3 {
        store: Arc<PrefixStore<AmazonS3>>,
        explain: Explain,
        url: PathBuf,
    }

    impl S3 {
        fn new(location: &Location) -> Result<S3, CubeError> {
            let Location::S3 { bucket, prefix } = location else {
                unreachable!("only called for object stores")
            };
            let url = location.display_path();
            let fail = |message: String| CubeError::Zarr { path: url.clone(), message };
            if bucket.is_empty() {
                return Err(fail("no bucket in the URL (s3://BUCKET/PREFIX)".to_string()));
            }
            let builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            let endpoint = builder
                .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
                .or_else(|| builder.get_config_value(&AmazonS3ConfigKey::Endpoint));
            // Otherwise every request fails with "HTTP error: builder error".
            if let Some(endpoint) = endpoint
                && endpoint.to_ascii_lowercase().starts_with("http://")
                && !yes(builder.get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)))
            {
                return Err(fail(format!(
                    "the endpoint {endpoint} (AWS_ENDPOINT_URL) is plain HTTP: set AWS_ALLOW_HTTP=true to use it"
                )));
            }
            let credentials = [
                AmazonS3ConfigKey::AccessKeyId,
                AmazonS3ConfigKey::WebIdentityTokenFile,
                AmazonS3ConfigKey::ContainerCredentialsRelativeUri,
                AmazonS3ConfigKey::ContainerCredentialsFullUri,
            ]
            .iter()
            .any(|key| builder.get_config_value(key).is_some())
                || yes(builder.get_config_value(&AmazonS3ConfigKey::SkipSignature));
            let s3 = builder.build().map_err(|e| {
                fail(format!("cannot set up the S3 client (AWS_* environment variables): {e}"))
            })?;
            Ok(S3 {
                store: Arc::new(PrefixStore::new(s3, prefix.as_str())),
                explain: Explain { bucket: bucket.clone(), credentials },
                url,
            })
        }

        fn fail(&self, what: &str, key: &str, e: &dyn std::fmt::Display) -> CubeError {
            CubeError::Zarr {
                path: self.url.clone(),
                message: format!("{what} {key}: {}", self.explain.message(e)),
            }
        }

        /// Every key under the prefix (one listing, paged by the client).
        fn list(&self) -> Result<Vec<String>, CubeError> {
            let lister =
                AsyncToSyncStorageAdapter::new(Arc::new(AsyncObjectStore::new(self.store.clone())), BlockOn);
            let keys = lister.list().map_err(|e| self.fail("cannot list", "the objects", &e))?;
            Ok(keys.into_iter().map(|key| key.as_str().to_string()).collect())
        }

        fn get(&self, key: &str) -> Result<Option<Bytes>, CubeError> {
            block_on(async {
                match self.store.get(&ObjectPath::from(key)).await {
                    Ok(result) => result.bytes().await.map(Some),
                    Err(ObjectError::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .map_err(|e| self.fail("cannot read", key, &e))
        }

        fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), CubeError> {
            block_on(self.store.put(&ObjectPath::from(key), bytes.into()))
                .map(drop)
                .map_err(|e| self.fail("cannot write", key, &e))
        }

        fn delete(&self, key: &str) -> Result<(), CubeError> {
            match block_on(self.store.delete(&ObjectPath::from(key))) {
                Ok(()) | Err(ObjectError::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.fail("cannot delete", key, &e)),
            }
        }
    }

    pub(super) fn readable(location: &Location) -> Result<ReadableStorage, CubeError> {
        readable_watched(location).map(|(store, _)| store)
    }

    pub(super) fn readable_watched(
        location: &Location,
    ) -> Result<(ReadableStorage, Arc<dyn super::Gone>), CubeError> {
        let s3 = S3::new(location)?;
        let reader = Arc::new(ObjectReader::new(s3.store, s3.explain));
        Ok((reader.clone(), reader))
    }

    /// Reads of an object store that ask for just the bytes wanted: a ranged GET per read (a suffix range
    /// for a shard's index), never a size query first. zarrs' `AsyncObjectStore` sends a HEAD before every
    /// partial read: two round trips per chunk instead of one.
    ///
    /// An object store cannot hold a cube still while `gen --overwrite` replaces it under a loader: once the
    /// root metadata has been read, every read asks for the object as it was then (`If-Unmodified-Since`
    /// the root's `Last-Modified`: a cube's objects are written before its root). An object written since
    /// is taken only while the root is still the one read (a cube copied by a tool that wrote its root
    /// first); otherwise the read fails and [`super::Gone`] says why.
    struct ObjectReader<T> {
        store: Arc<T>,
        explain: Explain,
        /// The root metadata's `Last-Modified` and `ETag` as first read: the cube opened.
        opened: OnceLock<(DateTime<Utc>, Option<String>)>,
        /// Objects are asked for unmodified since this (Unix seconds; [`UNSET`] before the root is read):
        /// the root's `Last-Modified`, raised to that of each object of the cube opened found written later.
        since: AtomicI64,
    }

    /// [`ObjectReader::since`] before the root is read.
    const UNSET: i64 = i64::MIN;

    impl<T> std::fmt::Debug for ObjectReader<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ObjectReader").field("opened", &self.opened).finish_non_exhaustive()
        }
    }

    impl<T: ObjectStore> super::Gone for ObjectReader<T> {
        fn check(&self) -> super::Presence {
            match block_on(self.replaced()) {
                Some(true) => super::Presence::Gone,
                Some(false) => super::Presence::There,
                None => super::Presence::Unreachable,
            }
        }
    }

    impl<T: ObjectStore> ObjectReader<T> {
        fn new(store: Arc<T>, explain: Explain) -> Self {
            ObjectReader { store, explain, opened: OnceLock::new(), since: AtomicI64::new(UNSET) }
        }

        fn error(&self, key: &StoreKey, e: &dyn std::fmt::Display) -> StorageError {
            StorageError::Other(format!("{key}: {}", self.explain.message(e)))
        }

        /// Keeps the root metadata's stamp the first time it is seen.
        fn note(&self, path: &ObjectPath, meta: &ObjectMeta) {
            if path.as_ref() == ROOT && self.opened.set((meta.last_modified, meta.e_tag.clone())).is_ok() {
                self.since.store(meta.last_modified.timestamp(), Ordering::Relaxed);
            }
        }

        /// Whether the root metadata is no longer the one first read (removed, or another); `None` where
        /// the store does not say.
        async fn replaced(&self) -> Option<bool> {
            let Some((modified, tag)) = self.opened.get() else { return Some(false) };
            match self.store.head(&ObjectPath::from(ROOT)).await {
                Ok(meta) => Some(meta.last_modified != *modified || meta.e_tag != *tag),
                Err(ObjectError::NotFound { .. }) => Some(true),
                Err(_) => None,
            }
        }

        /// `range` of the object at `path` (all of it for `None`), as it was when the cube was opened. One
        /// written since is read, then taken only if the root is still the one opened afterwards (a
        /// replacement removes the root before it writes anything): an object of the cube opened, written
        /// after its root (a cube copied root first), which later reads then take without asking again.
        async fn read_object(
            &self,
            path: &ObjectPath,
            range: Option<GetRange>,
        ) -> Result<Bytes, ObjectError> {
            let since = match self.since.load(Ordering::Relaxed) {
                UNSET => None,
                _ if path.as_ref() == ROOT => None,
                seconds => DateTime::from_timestamp(seconds, 0),
            };
            let options =
                GetOptions { range: range.clone(), if_unmodified_since: since, ..GetOptions::default() };
            match self.store.get_opts(path, options).await {
                Err(changed @ ObjectError::Precondition { .. }) => {
                    let got =
                        self.store.get_opts(path, GetOptions { range, ..GetOptions::default() }).await?;
                    let modified = got.meta.last_modified.timestamp();
                    let bytes = got.bytes().await?;
                    if self.replaced().await != Some(false) {
                        return Err(changed);
                    }
                    self.since.fetch_max(modified, Ordering::Relaxed);
                    Ok(bytes)
                }
                got => {
                    let got = got?;
                    self.note(path, &got.meta);
                    got.bytes().await
                }
            }
        }

        /// The bytes of `ranges` of `key`, `None` when there is no such object. The bounded ranges go in one
        /// call (the client merges near ones and sends the rest concurrently), the others one GET each.
        async fn read(
            &self,
            key: &StoreKey,
            ranges: &[ByteRange],
        ) -> Result<Option<Vec<Bytes>>, StorageError> {
            let path = ObjectPath::from(key.as_str());
            let mut out = vec![Bytes::new(); ranges.len()];
            let (mut bounded, mut bounded_at) = (Vec::new(), Vec::new());
            let mut asked = false;
            for (i, range) in ranges.iter().enumerate() {
                let range = match *range {
                    ByteRange::FromStart(_, Some(0)) | ByteRange::Suffix(0) => continue,
                    ByteRange::FromStart(offset, Some(length)) => {
                        bounded.push(offset..offset + length);
                        bounded_at.push(i);
                        continue;
                    }
                    ByteRange::FromStart(0, None) => None,
                    ByteRange::FromStart(offset, None) => Some(GetRange::Offset(offset)),
                    ByteRange::Suffix(length) => Some(GetRange::Suffix(length)),
                };
                match self.read_object(&path, range).await {
                    Ok(bytes) => out[i] = bytes,
                    Err(ObjectError::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(self.error(key, &e)),
                }
                asked = true;
            }
            if !bounded.is_empty() {
                // As `ObjectStore::get_ranges` does it (near ranges merged, the rest concurrently), each
                // request asking for the object as it was when the cube was opened.
                let fetch =
                    |range: std::ops::Range<u64>| self.read_object(&path, Some(GetRange::Bounded(range)));
                let got = match coalesce_ranges(&bounded, fetch, OBJECT_STORE_COALESCE_DEFAULT).await {
                    Ok(got) => got,
                    Err(ObjectError::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(self.error(key, &e)),
                };
                for ((&i, range), bytes) in bounded_at.iter().zip(&bounded).zip(got) {
                    // The store answers a range past the end with what there is.
                    if bytes.len() as u64 != range.end - range.start {
                        return Err(
                            self.error(key, &format!("bytes {range:?} asked, {} bytes there", bytes.len()))
                        );
                    }
                    out[i] = bytes;
                }
                asked = true;
            }
            // Only empty ranges: whether the object exists.
            if !asked && self.size(key).await?.is_none() {
                return Ok(None);
            }
            Ok(Some(out))
        }

        async fn size(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
            let path = ObjectPath::from(key.as_str());
            match self.store.head(&path).await {
                Ok(meta) => {
                    self.note(&path, &meta);
                    Ok(Some(meta.size))
                }
                Err(ObjectError::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.error(key, &e)),
            }
        }
    }

    impl<T: ObjectStore> ReadableStorageTraits for ObjectReader<T> {
        fn get_partial_many<'a>(
            &'a self,
            key: &StoreKey,
            byte_ranges: ByteRangeIterator<'a>,
        ) -> Result<MaybeBytesIterator<'a>, StorageError> {
            let ranges: Vec<ByteRange> = byte_ranges.collect();
            let bytes = block_on(self.read(key, &ranges))?;
            Ok(bytes.map(|bytes| Box::new(bytes.into_iter().map(Ok)) as _))
        }

        fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
            block_on(self.size(key))
        }

        fn supports_get_partial(&self) -> bool {
            true
        }
    }

    /// An upload's journal (`cubeload_upload.json`).
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Journal {
        /// Format version, and the mark of a cubeload upload.
        cubeload_upload: u32,
        /// The generation fingerprint of the cube being uploaded.
        fingerprint: String,
        /// Every object the upload may leave under the URL: those there before it, and the new cube's.
        keys: BTreeSet<String>,
    }

    /// What is under the URL, once found to be cubeload's.
    #[derive(Debug, PartialEq, Eq)]
    struct Found {
        /// Every key (relative to the URL).
        keys: Vec<String>,
        /// Whether a cube's root metadata is among them.
        root: bool,
    }

    /// Judges the `keys` under the URL (sorted), with the contents of its root metadata and journal when
    /// listed: `Err` with the reason when an upload of the cube of `fingerprint` must not replace them.
    fn judge(
        keys: &[String],
        root: Option<&[u8]>,
        journal: Option<&[u8]>,
        replace: bool,
        fingerprint: &str,
    ) -> Result<Found, String> {
        let journal: Option<Journal> = journal
            .and_then(|bytes| serde_json::from_slice(bytes).ok())
            .filter(|j: &Journal| j.cubeload_upload == 1);
        let nodes = match root {
            Some(root) => Some(cube_node_paths(root).ok_or_else(|| {
                "a Zarr store that cubeload did not make is here (its root metadata, zarr.json, is not a \
                 cubeload cube's); cubeload replaces only its own cubes: choose another URL or remove it"
                    .to_string()
            })?),
            None => None,
        };
        let ours = |key: &str| {
            key == PROBE
                || journal.as_ref().is_some_and(|j| key == JOURNAL || j.keys.contains(key))
                || nodes.as_ref().is_some_and(|nodes| {
                    // As for a local cube: metadata, the manifest, and what lies in an array's `c/`.
                    key == ROOT
                        || key == MANIFEST_FILE
                        || nodes.iter().any(|node| {
                            key.strip_prefix(node.as_str())
                                .and_then(|rest| rest.strip_prefix('/'))
                                .is_some_and(|rest| rest == ROOT || rest.starts_with("c/"))
                        })
                })
        };
        let foreign: Vec<&String> = keys.iter().filter(|key| !ours(key)).collect();
        if let Some(first) = foreign.first() {
            return Err(format!(
                "{} objects here are neither a cubeload cube's nor an unfinished cubeload upload's (such as \
                 {first}); cubeload replaces only its own cubes: choose another URL or remove them",
                foreign.len()
            ));
        }
        if !replace {
            if nodes.is_some() {
                return Err("a cube already exists here; pass --overwrite to replace it".to_string());
            }
            // An upload of this cube that did not finish is resumed; another cube's is replaced only if asked.
            let resumed = journal.as_ref().is_some_and(|j| j.fingerprint == fingerprint);
            let left: Vec<&String> = keys.iter().filter(|key| *key != JOURNAL && *key != PROBE).collect();
            if !resumed && let Some(first) = left.first() {
                return Err(format!(
                    "{} objects of an upload of another cube that did not finish are here (such as {first}); \
                     pass --overwrite to replace them",
                    left.len()
                ));
            }
        }
        Ok(Found { keys: keys.to_vec(), root: nodes.is_some() })
    }

    /// Lists and judges what is under the URL of `s3`.
    fn survey(s3: &S3, replace: bool, fingerprint: &str) -> Result<Found, CubeError> {
        let mut keys = s3.list()?;
        keys.sort();
        let read = |name: &str| if keys.iter().any(|key| key == name) { s3.get(name) } else { Ok(None) };
        let (root, journal) = (read(ROOT)?, read(JOURNAL)?);
        judge(&keys, root.as_deref(), journal.as_deref(), replace, fingerprint)
            .map_err(|message| CubeError::OutputTaken { path: s3.url.clone(), message })
    }

    /// A journal beside a cubeload root: an upload stopped after it wrote its root, before it removed its
    /// journal (the cube is complete), or before it removed the earlier cube's root (nothing else was
    /// touched yet: that cube is whole). Either way the journal names nothing to finish: it is removed, and
    /// the cube stays as any cube, replaced only with --overwrite.
    fn finish_upload(s3: &S3) -> Result<(), CubeError> {
        let (Some(root), Some(journal)) = (s3.get(ROOT)?, s3.get(JOURNAL)?) else { return Ok(()) };
        if cube_node_paths(&root).is_some() && serde_json::from_slice::<Journal>(&journal).is_ok() {
            s3.delete(JOURNAL)?;
        }
        Ok(())
    }

    /// The explained error when the bucket of `location` does not exist (one listing request), `None` when
    /// it does (or the store does not say).
    pub(super) fn missing_bucket(location: &Location) -> Result<Option<String>, CubeError> {
        let s3 = S3::new(location)?;
        Ok(block_on(s3.store.list_with_delimiter(None))
            .err()
            .map(|e| s3.explain.message(&e))
            .filter(|message| message.contains("NoSuchBucket")))
    }

    pub(super) fn check_replaceable(
        location: &Location,
        replace: bool,
        fingerprint: &str,
    ) -> Result<(), CubeError> {
        let s3 = S3::new(location)?;
        finish_upload(&s3)?;
        survey(&s3, replace, fingerprint)?;
        s3.put(PROBE, b"written and removed by cubeload gen, to learn whether it may write here".to_vec())?;
        s3.delete(PROBE).map_err(|e| match e {
            CubeError::Zarr { path, message } => CubeError::Zarr {
                path,
                message: format!(
                    "{message} (it stays there: cubeload takes it as its own, and removes it once it may)"
                ),
            },
            e => e,
        })
    }

    pub(super) fn upload(
        dir: &Path,
        location: &Location,
        replace: bool,
        fingerprint: &str,
    ) -> Result<(), CubeError> {
        let s3 = S3::new(location)?;
        let mut files = Vec::new();
        collect(dir, dir, &mut files)?;
        let new: BTreeSet<String> = files.iter().map(|(key, _)| key.clone()).collect();
        // Again: something may have come since the check before the cube was made.
        let found = survey(&s3, replace, fingerprint)?;
        let mut keys: BTreeSet<String> = found.keys.iter().filter(|key| *key != JOURNAL).cloned().collect();
        keys.extend(new.iter().cloned());
        let journal = Journal { cubeload_upload: 1, fingerprint: fingerprint.to_string(), keys };
        s3.put(JOURNAL, serde_json::to_vec(&journal).expect("serializable"))?;
        if found.root {
            // From here on readers see no cube rather than a mix of two.
            s3.delete(ROOT)?;
            // Loaders of the earlier cube take only objects unmodified since its root (to the second, as
            // stores stamp them): the new ones are written in a later second than it, and than this journal.
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        // What the new cube does not have: the earlier cube's dropped variables and chunks now all fill
        // value (left there, they would be read as the new cube's), an earlier upload's leftovers. Before the
        // new cube's objects: the journal still names them if this run stops.
        for key in found.keys.iter().filter(|key| *key != JOURNAL && *key != ROOT && !new.contains(*key)) {
            s3.delete(key)?;
        }
        for (key, path) in files.iter().filter(|(key, _)| key != ROOT) {
            let bytes = std::fs::read(path).map_err(|source| CubeError::Io { path: path.clone(), source })?;
            s3.put(key, bytes)?;
        }
        let root = dir.join(ROOT);
        let bytes = std::fs::read(&root).map_err(|source| CubeError::Io { path: root.clone(), source })?;
        s3.put(ROOT, bytes)?;
        // The cube is complete; a journal left (this delete failing) is known as cubeload's by the next run.
        let _ = s3.delete(JOURNAL);
        Ok(())
    }

    /// Every file under `dir` with its store key.
    fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), CubeError> {
        let io = |source| CubeError::Io { path: dir.to_path_buf(), source };
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.is_dir() {
                collect(root, &path, out)?;
            } else {
                let rel = path.strip_prefix(root).expect("under root").to_string_lossy().replace('\\', "/");
                StoreKey::new(rel.clone())
                    .map_err(|e| CubeError::Zarr { path: path.clone(), message: e.to_string() })?;
                out.push((rel, path));
            }
        }
        Ok(())
    }
    #[cfg(test)]
    mod tests {
        use zarrs_object_store::object_store::memory::InMemory;

        use super::*;

        fn keys(keys: &[&str]) -> Vec<String> {
            let mut keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
            keys.sort();
            keys
        }

        const CUBE_ROOT: &[u8] = br#"{"zarr_format":3,"node_type":"group","attributes":{"cubeload":{}},
            "consolidated_metadata":{"kind":"inline","must_understand":false,
            "metadata":{"t2m":{},"cubeload_index":{},"cubeload_index/t2m":{}}}}"#;

        fn journal(fingerprint: &str, keys: &[&str]) -> Vec<u8> {
            serde_json::to_vec(
                &serde_json::json!({"cubeload_upload": 1, "fingerprint": fingerprint, "keys": keys}),
            )
            .unwrap()
        }

        #[test]
        fn reads_ask_for_their_ranges_only() {
            let memory = InMemory::new();
            block_on(memory.put(&ObjectPath::from("a/c/0"), Bytes::from_static(b"0123456789").into()))
                .unwrap();
            let reader = ObjectReader::new(Arc::new(memory), Explain::default());
            let key = StoreKey::new("a/c/0").unwrap();
            let read = |ranges: Vec<ByteRange>| -> Option<Vec<Vec<u8>>> {
                reader
                    .get_partial_many(&key, Box::new(ranges.into_iter()))
                    .unwrap()
                    .map(|bytes| bytes.map(|b| b.unwrap().to_vec()).collect())
            };
            let got = read(vec![
                ByteRange::FromStart(2, Some(3)),
                ByteRange::Suffix(4),
                ByteRange::FromStart(7, None),
                ByteRange::FromStart(0, None),
                ByteRange::FromStart(5, Some(0)),
                ByteRange::FromStart(0, Some(1)),
            ]);
            let expected: Vec<&[u8]> = vec![b"234", b"6789", b"789", b"0123456789", b"", b"0"];
            assert_eq!(got.unwrap(), expected);
            assert_eq!(reader.size_key(&key).unwrap(), Some(10));
            // A range past the end is an error, not fewer bytes; a missing object is `None`.
            assert!(reader.get_partial(&key, ByteRange::FromStart(8, Some(4))).is_err());
            let missing = StoreKey::new("a/c/1").unwrap();
            assert!(reader.get_partial(&missing, ByteRange::Suffix(4)).unwrap().is_none());
            assert!(reader.get_partial(&missing, ByteRange::FromStart(0, Some(0))).unwrap().is_none());
            assert!(reader.get(&missing).unwrap().is_none());
            assert_eq!(reader.size_key(&missing).unwrap(), None);
        }

        /// Reads after the root's take the objects as they were then: one written since only while the root
        /// is the one read (a cube copied root first), none once the root is replaced or removed.
        #[test]
        fn reads_take_no_object_of_a_cube_put_in_place_of_the_one_opened() {
            let memory = Arc::new(InMemory::new());
            // Stores stamp objects to the second: each write here in a later second than the one before.
            let put = |key: &str, bytes: &'static [u8]| {
                std::thread::sleep(std::time::Duration::from_millis(1100));
                block_on(memory.put(&ObjectPath::from(key), Bytes::from_static(bytes).into())).unwrap();
            };
            put("t2m/c/0", b"old chunk");
            put(ROOT, b"old root");
            let reader = ObjectReader::new(memory.clone(), Explain::default());
            let read = |key: &str| reader.get(&StoreKey::new(key).unwrap()).map(|b| b.map(|b| b.to_vec()));
            assert_eq!(read(ROOT).unwrap().unwrap(), b"old root");
            assert_eq!(super::super::Gone::check(&reader), super::super::Presence::There);
            assert_eq!(read("t2m/c/0").unwrap().unwrap(), b"old chunk");
            // Written after the root, the root unchanged (a cube copied root first): read as it is.
            put("t2m/c/1", b"late chunk");
            assert_eq!(read("t2m/c/1").unwrap().unwrap(), b"late chunk");
            // A replacement removes the root, rewrites the objects, writes its root last.
            block_on(memory.delete(&ObjectPath::from(ROOT))).unwrap();
            put("t2m/c/0", b"new chunk");
            assert_eq!(super::super::Gone::check(&reader), super::super::Presence::Gone);
            assert!(read("t2m/c/0").is_err(), "a chunk of the new cube was read while the root was gone");
            put(ROOT, b"new root");
            assert!(read("t2m/c/0").is_err(), "a chunk of the new cube was read");
            assert_eq!(super::super::Gone::check(&reader), super::super::Presence::Gone);
        }

        #[test]
        fn only_cubeload_cubes_and_unfinished_uploads_are_replaced() {
            let fp = "f1";
            // A Zarr v2 store: every object is someone else's, --overwrite or not.
            let v2 = keys(&[".zgroup", ".zmetadata", "t2m/.zarray", "t2m/0.0.0", "precip/.zarray"]);
            for replace in [false, true] {
                let refused = judge(&v2, None, None, replace, fp).unwrap_err();
                assert!(refused.contains("5 objects") && refused.contains(".zgroup"), "{refused}");
                assert!(!refused.contains("--overwrite"), "{refused}");
            }
            // A cube: its nodes' objects and its manifest are its own; an object outside them is not.
            let cube = keys(&[
                "zarr.json",
                "cubeload_manifest.jsonl",
                "t2m/zarr.json",
                "t2m/c/0/0/0",
                "cubeload_index/t2m/c/0",
            ]);
            assert!(judge(&cube, Some(CUBE_ROOT), None, false, fp).unwrap_err().contains("--overwrite"));
            assert_eq!(
                judge(&cube, Some(CUBE_ROOT), None, true, fp).unwrap(),
                Found { keys: cube.clone(), root: true }
            );
            let mut more = cube.clone();
            more.push("notes/readme.txt".to_string());
            assert!(judge(&more, Some(CUBE_ROOT), None, true, fp).unwrap_err().contains("notes/readme.txt"));
            // Inside a node, only metadata and what lies in an array's `c/` are the cube's: a file of the user's
            // or another cube put there is not (an --overwrite deleted them).
            for stray in ["t2m/mine.bin", "t2m/inner/zarr.json", "cubeload_index/t2m/notes.txt"] {
                let mut more = cube.clone();
                more.push(stray.to_string());
                assert!(
                    judge(&more, Some(CUBE_ROOT), None, true, fp).unwrap_err().contains(stray),
                    "{stray}"
                );
            }
            let plain = br#"{"zarr_format":3,"node_type":"group","attributes":{}}"#;
            assert!(judge(&cube, Some(plain), None, true, fp).unwrap_err().contains("cubeload did not make"));
            // Without a root: only what a journal names (a chunk key alone could be anyone's).
            let left = keys(&["cubeload_upload.json", "t2m/zarr.json", "t2m/c/0/0/0"]);
            let named = journal(fp, &["t2m/zarr.json", "t2m/c/0/0/0", "t2m/c/0/0/1", "zarr.json"]);
            assert!(judge(&left[1..], None, None, true, fp).unwrap_err().contains("t2m/c/0/0/0"));
            assert!(judge(&left, None, Some(b"{}"), true, fp).unwrap_err().contains("cubeload_upload.json"));
            let mut stray = left.clone();
            stray.push("t2m/c/9/0/0".to_string());
            assert!(judge(&stray, None, Some(&named), true, fp).unwrap_err().contains("t2m/c/9/0/0"));
            // This cube's upload is resumed; another cube's is replaced only with --overwrite.
            assert_eq!(
                judge(&left, None, Some(&named), false, fp).unwrap(),
                Found { keys: left.clone(), root: false }
            );
            let other = judge(&left, None, Some(&named), false, "f2").unwrap_err();
            assert!(other.contains("did not finish") && other.contains("--overwrite"), "{other}");
            assert!(judge(&left, None, Some(&named), true, "f2").is_ok());
            // A probe left by a check that could not delete it is cubeload's.
            assert!(judge(&keys(&["cubeload_probe"]), None, None, false, fp).is_ok());
        }
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

    pub(super) fn readable_watched(
        location: &Location,
    ) -> Result<(ReadableStorage, std::sync::Arc<dyn super::Gone>), CubeError> {
        Err(unsupported(location))
    }

    pub(super) fn missing_bucket(location: &Location) -> Result<Option<String>, CubeError> {
        Err(unsupported(location))
    }

    pub(super) fn upload(_: &Path, location: &Location, _: bool, _: &str) -> Result<(), CubeError> {
        Err(unsupported(location))
    }

    pub(super) fn check_replaceable(location: &Location, _: bool, _: &str) -> Result<(), CubeError> {
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
    store: ReadableStorage,
    requests: Arc<AtomicU64>,
}

impl LatencyStore {
    /// Wraps `inner`, adding `delay` to each request.
    #[must_use]
    pub fn new(inner: ReadableStorage, delay: Duration) -> Self {
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        let before = move || {
            counted.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(delay);
        };
        LatencyStore { store: Arc::new(Hooked { inner, before }), requests }
    }

    /// The store, for a loader to read through.
    #[must_use]
    pub fn store(&self) -> ReadableStorage {
        self.store.clone()
    }

    /// Requests answered so far.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
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
