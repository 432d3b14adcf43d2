//! The manifest: one line per finished block, with the files it wrote and their checksums.
//!
//! It is what makes generation restartable and cubes checkable:
//! - `gen` appends a line once a block's files are stored; a run killed at any moment and started again
//!   keeps the blocks whose line is there *and* whose files still match their checksums (so a torn write or
//!   a power loss that lost data only costs that block), and redoes the rest;
//! - `gen --append` reuses the blocks of the previous cube whose inputs are unchanged;
//! - partitioned runs (`--part K/N`) each write their own manifest file, merged by `--finalize`;
//! - `verify` compares every stored file with its line.
//!
//! Once the cube is complete, a last line seals the rest of it: every other file (metadata, coordinates,
//! validity index) with its length and checksum, so that `verify` finds those changed too.
//!
//! A block's line also carries what the block contributes to the cube's statistics and validity index, so
//! a resumed run ends with the same cube, bit for bit, as an uninterrupted one. Numbers are stored as bit
//! patterns where a decimal round trip could change the last digit.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CubeError, RunningStats};

/// File name of the (merged) manifest inside a cube.
pub const MANIFEST_FILE: &str = "cubeload_manifest.jsonl";

/// Whether a file named `name` is what a run killed between writing a file and renaming it into place
/// left (`.NAME.PID.tmp`, `.NAME.cubeload-copy-N`): not part of the cube.
#[must_use]
pub fn is_leftover(name: &str) -> bool {
    name.starts_with('.')
        && (Path::new(name).extension().is_some_and(|e| e == "tmp") || name.contains(".cubeload-copy-"))
}

/// Version of the manifest format.
const MANIFEST_VERSION: u32 = 1;

/// First line of a manifest: what the blocks below were made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestHeader {
    /// The format version of the manifest (`MANIFEST_VERSION`).
    pub cubeload_manifest: u32,
    /// Digest of the configuration and of every input file (size and SHA-256): a run with another
    /// fingerprint must not continue this cube.
    pub fingerprint: String,
    /// Creation time of the cube (kept when a run resumes, so that a resumed cube equals an uninterrupted
    /// one).
    pub created: String,
}

impl ManifestHeader {
    /// A header for a new cube.
    #[must_use]
    pub fn new(fingerprint: String, created: String) -> Self {
        ManifestHeader { cubeload_manifest: MANIFEST_VERSION, fingerprint, created }
    }
}

/// Which block: a variable's time chunk, chunk row and range of shards along x.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockId {
    /// Variable name.
    pub var: String,
    /// Time chunk (0 for static variables).
    pub it: usize,
    /// Chunk row (sample shard row for sample-major cubes).
    pub iy: usize,
    /// First shard along x.
    pub first_shard: usize,
    /// Shards covered.
    pub n_shards: usize,
}

impl std::fmt::Display for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "variable `{}`, time chunk {}, chunk row {}, shard {}",
            self.var, self.it, self.iy, self.first_shard
        )
    }
}

/// One stored file (a chunk or a shard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Store key, relative to the cube's root (`t2m/c/0/3/1`): a path inside the cube, checked when read
    /// (a manifest is untrusted input: `/etc/passwd` or `../x` would have `verify` read, and an append
    /// replace, a file outside it).
    #[serde(deserialize_with = "key_inside_the_cube")]
    pub key: String,
    /// Length in bytes; `None` when nothing was stored (every value was the fill value).
    pub len: Option<u64>,
    /// XXH3 (64 bits) of the file's bytes. Not a CRC32C: a file that ends with the CRC32C of its own bytes
    /// (a chunk stored with Zarr's `crc32c` codec, unsharded) has the same CRC32C whatever it holds, so that
    /// record checked its length only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh3: Option<u64>,
    /// CRC32C of the file's bytes: all that cubes made before `xxh3` recorded, checked where no `xxh3` is;
    /// still recorded, for those builds to check a newer cube (they would take every file for damaged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<u32>,
}

impl FileRecord {
    /// Reads the file at `root/key` and records its length and digest (or its absence).
    ///
    /// # Errors
    /// [`CubeError::Io`] when the file exists but cannot be read.
    pub fn of(root: &Path, key: &str) -> Result<FileRecord, CubeError> {
        let bytes = read_if_present(root, key)?;
        Ok(FileRecord {
            key: key.to_string(),
            len: bytes.as_ref().map(|b| b.len() as u64),
            xxh3: bytes.as_deref().map(xxhash_rust::xxh3::xxh3_64),
            crc32c: bytes.as_deref().map(crc32c::crc32c),
        })
    }

    /// What is wrong with this file under `root`, if anything.
    #[must_use]
    pub fn check(&self, root: &Path) -> Option<String> {
        let path = root.join(&self.key);
        let found = match regular_file(&path) {
            Ok(found) => found,
            Err(e) => return Some(e.to_string()),
        };
        // A file of another length is found without reading it.
        if let (Some(len), Some(found)) = (self.len, &found)
            && found.len() != len
        {
            return Some(format!("{} bytes instead of {len} (truncated or overwritten)", found.len()));
        }
        let bytes = match found.map(|_| std::fs::read(&path)).transpose() {
            Ok(bytes) => bytes,
            Err(source) => return Some(CubeError::Io { path, source }.to_string()),
        };
        match (bytes, self.len) {
            (None, None) => None,
            (None, Some(_)) => Some("missing".to_string()),
            (Some(_), None) => Some("present, but the manifest says it was never stored".to_string()),
            (Some(bytes), Some(len)) if bytes.len() as u64 != len => {
                Some(format!("{} bytes instead of {len} (truncated or overwritten)", bytes.len()))
            }
            (Some(bytes), Some(_)) => match (self.xxh3, self.crc32c) {
                (Some(recorded), _) => {
                    let found = xxhash_rust::xxh3::xxh3_64(&bytes);
                    (found != recorded)
                        .then(|| format!("checksum mismatch: xxh3 {found:016x}, manifest {recorded:016x}"))
                }
                (None, Some(recorded)) => {
                    let found = crc32c::crc32c(&bytes);
                    (found != recorded)
                        .then(|| format!("checksum mismatch: crc32c {found:08x}, manifest {recorded:08x}"))
                }
                (None, None) => None,
            },
        }
    }
}

/// A store key that names a file inside the cube: relative, of plain names only.
fn key_inside_the_cube<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let key = String::deserialize(deserializer)?;
    let inside =
        !key.is_empty() && Path::new(&key).components().all(|c| matches!(c, std::path::Component::Normal(_)));
    if inside {
        Ok(key)
    } else {
        Err(serde::de::Error::custom(format!("key {key:?} is not a path inside the cube")))
    }
}

/// The metadata of the regular file at `path`, or `None` where there is no such file; a file that is not a
/// regular one (a FIFO, a device) is an error, so that it is never read.
fn regular_file(path: &Path) -> Result<Option<std::fs::Metadata>, CubeError> {
    let io = |source| CubeError::Io { path: path.to_path_buf(), source };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(e)),
        Ok(m) if !m.is_file() => Err(io(std::io::Error::other("not a regular file"))),
        Ok(m) => Ok(Some(m)),
    }
}

/// The bytes of `root/key`, or `None` where there is no such file ([`regular_file`]).
fn read_if_present(root: &Path, key: &str) -> Result<Option<Vec<u8>>, CubeError> {
    let path = root.join(key);
    match regular_file(&path)? {
        Some(_) => std::fs::read(&path).map(Some).map_err(|source| CubeError::Io { path, source }),
        None => Ok(None),
    }
}

/// What one finished block stored and contributes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockRecord {
    /// Which block.
    pub block: BlockId,
    /// Digest of everything the block's values depend on (encoding, target steps, input files and bands):
    /// a block is reused only when it is unchanged.
    pub inputs: String,
    /// The files it stored.
    pub files: Vec<FileRecord>,
    /// Statistics of its valid values.
    pub stats: StatsBits,
    /// Cells inside the grid extent.
    pub cells: u64,
    /// Valid cells among them.
    pub valid: u64,
    /// Cells among them stored as missing because the variable's type cannot hold their value apart from
    /// its fill value (±∞, out of its range); absent where none (and in manifests of earlier builds).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unstorable: u64,
    /// `(chunk x index, fraction of valid cells)` per batch chunk.
    pub validity: Vec<(usize, f32)>,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `skip_serializing_if` passes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl BlockRecord {
    /// The first file that does not match under `root`, with what is wrong.
    #[must_use]
    pub fn first_mismatch(&self, root: &Path) -> Option<(String, String)> {
        self.files.iter().find_map(|f| f.check(root).map(|why| (f.key.clone(), why)))
    }
}

/// [`RunningStats`] as exact bit patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsBits {
    count: u64,
    mean: u64,
    m2: u64,
    min: u64,
    max: u64,
}

impl From<&RunningStats> for StatsBits {
    fn from(s: &RunningStats) -> Self {
        let [mean, m2, min, max] = s.moments();
        StatsBits {
            count: s.count(),
            mean: mean.to_bits(),
            m2: m2.to_bits(),
            min: min.to_bits(),
            max: max.to_bits(),
        }
    }
}

impl From<StatsBits> for RunningStats {
    fn from(b: StatsBits) -> Self {
        RunningStats::from_moments(
            b.count,
            [f64::from_bits(b.mean), f64::from_bits(b.m2), f64::from_bits(b.min), f64::from_bits(b.max)],
        )
    }
}

/// The last line of a complete cube's manifest: its files that no block stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seal {
    sealed: Vec<FileRecord>,
}

/// Whether `name` is the manifest of one part of a generation split by `--part K/N`.
pub(crate) fn is_part_manifest(name: &str) -> bool {
    name.starts_with("cubeload_manifest.part-") && Path::new(name).extension().is_some_and(|e| e == "jsonl")
}

/// Whether a part of a split generation has recorded blocks in `dir` (a cube's staging directory).
pub(crate) fn holds_parts(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| e.file_name().to_str().is_some_and(is_part_manifest))
    })
}

/// Everything the manifest files of a cube directory say.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    /// The header (of the first file read); `None` when there is no manifest.
    pub header: Option<ManifestHeader>,
    /// Finished blocks, the last record of a block winning.
    pub records: Vec<BlockRecord>,
    /// The files of the complete cube that no block stored (metadata, coordinates, validity index); `None`
    /// before completion, and in cubes made before version 0.1 sealed them.
    pub sealed: Option<Vec<FileRecord>>,
    /// Lines that could not be read, other than a torn last line (`cubeload_manifest.jsonl line 5`):
    /// damage to the manifest itself. The blocks they recorded count as not finished.
    pub unreadable: Vec<String>,
    /// Files left out for a header that differs from the first one's: runs of another configuration or
    /// other inputs (a part run with another config).
    pub other_runs: Vec<String>,
}

impl Manifest {
    /// Reads `cubeload_manifest.jsonl` and the per-part files `cubeload_manifest.part-*.jsonl` of `dir`.
    /// A line cut short by a crash (the last of a file) is ignored; so is a file whose header differs from
    /// the first one read (it belongs to another configuration). Any other line that cannot be read is
    /// listed in [`Manifest::unreadable`].
    ///
    /// # Errors
    /// [`CubeError::Io`] when a manifest file cannot be read.
    pub fn load(dir: &Path) -> Result<Manifest, CubeError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n == MANIFEST_FILE || is_part_manifest(n))
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        let mut manifest = Manifest::default();
        let mut index: HashMap<BlockId, usize> = HashMap::new();
        for path in files {
            // Lossy: a line torn in the middle of a character is skipped as any torn line is.
            let bytes =
                std::fs::read(&path).map_err(|source| CubeError::Io { path: path.clone(), source })?;
            let text = String::from_utf8_lossy(&bytes);
            let name = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            let lines: Vec<&str> = text.lines().collect();
            let Some(header) = lines.first().and_then(|l| serde_json::from_str::<ManifestHeader>(l).ok())
            else {
                if !lines.is_empty() {
                    manifest.unreadable.push(format!("{name} line 1 (its header)"));
                }
                continue;
            };
            match &manifest.header {
                Some(first) if first.fingerprint != header.fingerprint => {
                    manifest.other_runs.push(name);
                    continue;
                }
                Some(_) => {}
                None => manifest.header = Some(header),
            }
            for (n, line) in lines.iter().enumerate().skip(1) {
                if let Ok(record) = serde_json::from_str::<BlockRecord>(line) {
                    if let Some(&i) = index.get(&record.block) {
                        manifest.records[i] = record;
                    } else {
                        index.insert(record.block.clone(), manifest.records.len());
                        manifest.records.push(record);
                    }
                } else if let Ok(seal) = serde_json::from_str::<Seal>(line) {
                    manifest.sealed = Some(seal.sealed);
                } else if n + 1 < lines.len() || text.ends_with('\n') {
                    // Not the torn end of an interrupted append: damaged.
                    manifest.unreadable.push(format!("{name} line {}", n + 1));
                }
            }
        }
        Ok(manifest)
    }

    /// Appends the seal to the manifest of the complete cube in `dir`: every file under it that neither a
    /// block record nor the manifest holds, with its length and checksum.
    ///
    /// # Errors
    /// [`CubeError::Io`] on filesystem failures.
    pub fn seal(dir: &Path) -> Result<(), CubeError> {
        let manifest = Manifest::load(dir)?;
        let stored: std::collections::HashSet<&str> =
            manifest.records.iter().flat_map(|r| &r.files).map(|f| f.key.as_str()).collect();
        let mut keys = Vec::new();
        let mut dirs = vec![PathBuf::new()];
        while let Some(rel) = dirs.pop() {
            let at = dir.join(&rel);
            let entries =
                std::fs::read_dir(&at).map_err(|source| CubeError::Io { path: at.clone(), source })?;
            for entry in entries {
                let entry = entry.map_err(|source| CubeError::Io { path: at.clone(), source })?;
                let key = rel.join(entry.file_name());
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.path().is_dir() {
                    dirs.push(key);
                } else if is_leftover(&name) {
                    // What a run killed between writing a file and renaming it into place left: not part of
                    // the cube (nor to be uploaded with it).
                    std::fs::remove_file(entry.path())
                        .map_err(|source| CubeError::Io { path: entry.path(), source })?;
                } else {
                    keys.push(key.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        keys.retain(|k| k != MANIFEST_FILE && !stored.contains(k.as_str()));
        keys.sort();
        let sealed = keys.iter().map(|k| FileRecord::of(dir, k)).collect::<Result<Vec<_>, _>>()?;
        let mut line = serde_json::to_string(&Seal { sealed }).expect("serializable");
        line.push('\n');
        let path = dir.join(MANIFEST_FILE);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(line.as_bytes()))
            .map_err(|source| CubeError::Io { path, source })
    }

    /// The bytes of a cube's files as its manifest `text` lists them: the blocks' files, those of the seal
    /// and the manifest itself (every file of a sealed cube; of a cube of an earlier build, its chunks and
    /// manifest). What `info` reports of a cube on an object store, which it does not list.
    #[must_use]
    pub fn stored_bytes(text: &str) -> u64 {
        let files = |line: &str| -> Vec<FileRecord> {
            serde_json::from_str::<BlockRecord>(line)
                .map(|r| r.files)
                .or_else(|_| serde_json::from_str::<Seal>(line).map(|s| s.sealed))
                .unwrap_or_default()
        };
        let listed: u64 = text.lines().flat_map(files).filter_map(|f| f.len).sum();
        listed + text.len() as u64
    }

    /// The fingerprint of the manifest in `dir`, if it has one.
    #[must_use]
    pub fn fingerprint(dir: &Path) -> Option<String> {
        Manifest::load(dir).ok().and_then(|m| m.header).map(|h| h.fingerprint)
    }
}

/// Appends block records to one manifest file, a line each, flushed as they come.
#[derive(Debug)]
pub struct ManifestWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl ManifestWriter {
    /// Writes `dir/name` afresh with `header` and `records` (through a temporary file and a rename, so that
    /// a crash leaves the previous version or the new one), then keeps it open for appending.
    ///
    /// # Errors
    /// [`CubeError::Io`] on filesystem failures.
    pub fn create(
        dir: &Path,
        name: &str,
        header: &ManifestHeader,
        records: &[&BlockRecord],
    ) -> Result<ManifestWriter, CubeError> {
        let path = dir.join(name);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CubeError::Io { path, source }
        };
        // Unique per process: the parts of a partitioned run may write the same file at once.
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut text = serde_json::to_string(header).expect("serializable");
        text.push('\n');
        for record in records {
            text.push_str(&serde_json::to_string(record).expect("serializable"));
            text.push('\n');
        }
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).map_err(io(&path))?;
        Ok(ManifestWriter { path, file })
    }

    /// Appends one record.
    ///
    /// # Errors
    /// [`CubeError::Io`] when writing fails.
    pub fn append(&mut self, record: &BlockRecord) -> Result<(), CubeError> {
        let mut line = serde_json::to_string(record).expect("serializable");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| CubeError::Io { path: self.path.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(var: &str, it: usize, key: &str, file: &FileRecord) -> BlockRecord {
        let stats = RunningStats::of_rows(&[&[1.0, 2.5, -3.25]], |_| true);
        BlockRecord {
            block: BlockId { var: var.into(), it, iy: 0, first_shard: 0, n_shards: 1 },
            inputs: "abc".into(),
            files: vec![FileRecord { key: key.into(), ..file.clone() }],
            stats: (&stats).into(),
            cells: 3,
            valid: 3,
            unstorable: 0,
            validity: vec![(0, 0.1)],
        }
    }

    #[test]
    fn the_seal_lists_the_files_no_block_stored_and_removes_what_killed_runs_left() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("t2m/c")).unwrap();
        for (file, bytes) in [
            ("zarr.json", "root"),
            ("t2m/zarr.json", "array"),
            ("t2m/c/0", "chunk"),
            (".cubeload_manifest.jsonl.42.tmp", "a manifest never renamed"),
            ("t2m/c/.1.cubeload-copy-7", "a copy never renamed"),
        ] {
            std::fs::write(root.join(file), bytes).unwrap();
        }
        let chunk = FileRecord::of(root, "t2m/c/0").unwrap();
        let header = ManifestHeader::new("fp".into(), "2026-01-01T00:00:00Z".into());
        drop(ManifestWriter::create(root, MANIFEST_FILE, &header, &[&record("t2m", 0, "t2m/c/0", &chunk)]));
        Manifest::seal(root).unwrap();
        let manifest = Manifest::load(root).unwrap();
        let sealed: Vec<&str> = manifest.sealed.iter().flatten().map(|f| f.key.as_str()).collect();
        assert_eq!(sealed, ["t2m/zarr.json", "zarr.json"]);
        assert!(manifest.sealed.iter().flatten().all(|f| f.check(root).is_none()));
        assert!(!root.join(".cubeload_manifest.jsonl.42.tmp").exists());
        assert!(!root.join("t2m/c/.1.cubeload-copy-7").exists());
        assert_eq!((manifest.records.len(), manifest.unreadable.len()), (1, 0));
    }

    #[test]
    fn round_trip_ignores_a_torn_last_line_and_detects_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("t2m")).unwrap();
        std::fs::write(dir.path().join("t2m/c0"), b"chunk bytes").unwrap();
        let file = FileRecord::of(dir.path(), "t2m/c0").unwrap();
        assert_eq!(file.len, Some(11));
        let header = ManifestHeader::new("fp".into(), "2026-01-01T00:00:00Z".into());
        let (a, b) = (record("t2m", 0, "t2m/c0", &file), record("t2m", 1, "t2m/c1", &file));
        let mut writer = ManifestWriter::create(dir.path(), MANIFEST_FILE, &header, &[&a]).unwrap();
        writer.append(&b).unwrap();
        // A crash in the middle of a line, and of a character of it.
        let path = dir.path().join(MANIFEST_FILE);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"block\":{\"var\":\"t2\xc3");
        std::fs::write(&path, text).unwrap();

        let manifest = Manifest::load(dir.path()).unwrap();
        assert_eq!(manifest.header, Some(header));
        assert_eq!(manifest.records, vec![a.clone(), b.clone()]);
        let stats: RunningStats = manifest.records[0].stats.into();
        assert_eq!(StatsBits::from(&stats), a.stats);

        assert_eq!(a.first_mismatch(dir.path()), None);
        assert_eq!(b.first_mismatch(dir.path()), Some(("t2m/c1".into(), "missing".into())));
        std::fs::write(dir.path().join("t2m/c0"), b"chunk bytez").unwrap();
        assert!(a.first_mismatch(dir.path()).unwrap().1.starts_with("checksum mismatch"));
        std::fs::write(dir.path().join("t2m/c0"), b"chunk").unwrap();
        assert!(a.first_mismatch(dir.path()).unwrap().1.contains("truncated"));
    }

    /// A file ending with the CRC32C of its own bytes (Zarr's `crc32c` codec) has one CRC32C whatever it
    /// holds; its record must still tell two contents of one length apart.
    #[test]
    fn a_file_ending_with_its_own_crc32c_is_checked_by_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let with_crc = |content: &[u8]| {
            let mut bytes = content.to_vec();
            bytes.extend_from_slice(&crc32c::crc32c(content).to_le_bytes());
            bytes
        };
        let (first, second) = (with_crc(b"valid 1.0"), with_crc(b"valid 0.0"));
        assert_eq!(crc32c::crc32c(&first), crc32c::crc32c(&second), "the residue every such file shares");
        std::fs::write(dir.path().join("index"), &first).unwrap();
        let record = FileRecord::of(dir.path(), "index").unwrap();
        assert_eq!(record.check(dir.path()), None);
        std::fs::write(dir.path().join("index"), &second).unwrap();
        assert!(record.check(dir.path()).unwrap().starts_with("checksum mismatch: xxh3"));
    }

    /// A manifest is untrusted: a key outside the cube (absolute, or up through `..`) makes its line
    /// unreadable instead of having `verify` read, or an append replace, a file elsewhere; a key naming
    /// something that is not a regular file is an error, not read (a FIFO would hang the reader).
    #[test]
    fn keys_outside_the_cube_and_files_that_are_not_regular_are_refused() {
        for key in ["/etc/hostname", "../../x", "t2m/../../x", "./t2m", ""] {
            let line = format!(r#"{{"key":{key:?},"len":1,"xxh3":0}}"#);
            let error = serde_json::from_str::<FileRecord>(&line).unwrap_err().to_string();
            assert!(error.contains("is not a path inside the cube"), "{key}: {error}");
        }
        assert!(serde_json::from_str::<FileRecord>(r#"{"key":"t2m/c/0/1/2","len":1,"xxh3":0}"#).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let fifo = std::ffi::CString::new(dir.path().join("pipe").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let record = FileRecord { key: "pipe".into(), len: Some(4), xxh3: Some(0), crc32c: None };
        assert!(record.check(dir.path()).unwrap().contains("not a regular file"));
    }

    /// A record of an earlier build, with a CRC32C and no XXH3, is checked by its CRC32C.
    #[test]
    fn a_record_of_an_earlier_build_is_checked_by_its_crc32c() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c0"), b"chunk bytes").unwrap();
        let line = format!(r#"{{"key":"c0","len":11,"crc32c":{}}}"#, crc32c::crc32c(b"chunk bytes"));
        let record: FileRecord = serde_json::from_str(&line).unwrap();
        assert_eq!((record.xxh3, record.check(dir.path())), (None, None));
        std::fs::write(dir.path().join("c0"), b"chunk bytez").unwrap();
        assert!(record.check(dir.path()).unwrap().starts_with("checksum mismatch: crc32c"));
        let missing: FileRecord = serde_json::from_str(r#"{"key":"c1","len":null,"crc32c":null}"#).unwrap();
        assert_eq!(missing.check(dir.path()), None);
    }
}
