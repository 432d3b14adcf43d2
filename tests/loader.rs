//! The loader against the cube read directly with zarrs: coverage, values, determinism, resume, sharding,
//! shutdown, errors and memory.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cubeload::loader::assemble::{Assembler, Transform};
use cubeload::loader::{Loader, LoaderBuilder, LoaderError, OnCorrupt};
use cubeload::{Batch, Config, GenOptions, Plan, generate};

use crate::util::{array, copy_dir, read_f32, walk};

struct Cubes {
    _dir: tempfile::TempDir,
    pixel: PathBuf,
    image: PathBuf,
    shuffled: PathBuf,
    /// Batches of 512 series, large enough for their buffers to be kept when given back.
    wide: PathBuf,
}

/// Demo inputs and two cubes over them (pixel_series, image_sequence), made once per test run.
fn cubes() -> &'static Cubes {
    static CUBES: OnceLock<Cubes> = OnceLock::new();
    CUBES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let spec = cubeload::demo::DemoSpec { hours: 48, ..Default::default() };
        let text = cubeload::demo::write_inputs(dir.path(), &spec).unwrap();
        let make = |name: &str, layout: &str| {
            let text = text
                .replace("demo.zarr", &format!("{name}.zarr"))
                .replace("layout: { kind: pixel_series, batch: 256 }", layout);
            let plan =
                Plan::new(Config::from_yaml(&text, Path::new("test.yaml")).unwrap(), text.clone()).unwrap();
            generate(&plan, &GenOptions::default(), &|_, _| {}).unwrap().path
        };
        let pixel = make("pixel", "layout: { kind: pixel_series, batch: 64 }");
        let image = make("image", "layout: { kind: image_sequence, seq_len: 8, patch: [8, 8], batch: 4 }");
        let shuffled =
            make("shuffled", "layout: { kind: pixel_series, batch: 64, order: shuffled, seed: 5 }");
        let wide = make("wide", "layout: { kind: pixel_series, batch: 512 }");
        Cubes { _dir: dir, pixel, image, shuffled, wide }
    })
}

fn collect(loader: Loader) -> Vec<Batch> {
    loader.map(Result::unwrap).collect()
}

fn fingerprint(batches: &[Batch]) -> Vec<(usize, usize, [usize; 3], u64)> {
    batches
        .iter()
        .map(|b| {
            let sum =
                b.data.iter().fold(0u64, |h, x| h.wrapping_mul(31).wrapping_add(u64::from(x.to_bits())));
            (b.origin.epoch, b.origin.position, b.origin.chunk, sum)
        })
        .collect()
}

/// Every value and mask element of `batches` (of the pixel cube's shape) is the cube's value as zarrs reads
/// it (NaN and padding: fill 0, mask 0). Returns the cells each batch's samples are, per batch.
fn assert_cube_values(cube: &Path, batches: &[Batch]) -> Vec<Vec<(usize, usize)>> {
    let (nt, h, w) = (48usize, 100usize, 150usize);
    let t2m = read_f32(cube, "t2m", Some(0..nt as u64), h as u64, w as u64);
    let ndvi = read_f32(cube, "ndvi", Some(0..nt as u64), h as u64, w as u64);
    let lc = array(cube, "landcover").retrieve_array_subset::<Vec<u8>>(&[0..h as u64, 0..w as u64]).unwrap();
    let lat = coordinate(cube, "lat");
    let lon = coordinate(cube, "lon");
    let mut cells = Vec::new();
    for b in batches {
        assert_eq!(b.shape, vec![64, nt, 3]);
        let mut batch_cells = Vec::new();
        for s in 0..b.len() {
            let y = lat.iter().position(|&v| v == b.lat[s]).unwrap();
            let x = lon.iter().position(|&v| v == b.lon[s]).unwrap();
            batch_cells.push((y, x));
            for t in 0..nt {
                let o = (s * nt + t) * 3;
                let inside = y < h && x < w;
                let expect = [
                    if inside { t2m[t * h * w + y * w + x] } else { f32::NAN },
                    if inside { ndvi[t * h * w + y * w + x] } else { f32::NAN },
                    if inside { f32::from(lc[y * w + x]) } else { f32::NAN },
                ];
                for v in 0..3 {
                    if expect[v].is_nan() {
                        assert_eq!((b.mask[o + v], b.data[o + v]), (0, 0.0), "missing → fill 0, mask 0");
                    } else {
                        assert_eq!((b.mask[o + v], b.data[o + v]), (1, expect[v]));
                    }
                }
            }
        }
        cells.push(batch_cells);
    }
    cells
}

#[test]
fn every_valid_pixel_once_per_epoch_with_the_cube_values() {
    let cube = &cubes().pixel;
    let loader = Loader::builder(cube).shuffle(3).epochs(2).build().unwrap();
    let (names, _) = loader.variable_names();
    assert_eq!(names, ["t2m", "ndvi", "landcover"]);
    let per_epoch = loader.batches_per_epoch();
    let batches = collect(loader);
    assert_eq!(batches.len(), 2 * per_epoch);
    let (h, w) = (100usize, 150usize);
    let cells = assert_cube_values(cube, &batches);
    for epoch in 0..2 {
        let mut seen = HashSet::new();
        for (b, batch_cells) in batches.iter().zip(&cells).filter(|(b, _)| b.origin.epoch == epoch) {
            for &(y, x) in batch_cells {
                assert!(
                    seen.insert((y, x)),
                    "pixel ({y}, {x}) twice in epoch {epoch} (batch {:?})",
                    b.origin
                );
            }
        }
        // Every cell of the grid came exactly once (padding cells too: their batches hold valid pixels).
        assert!((0..h).all(|y| (0..w).all(|x| seen.contains(&(y, x)))), "epoch {epoch} misses pixels");
    }
}

/// A copy of the pixel cube in `dir`, the path of its first ndvi shard, that shard's bytes and where its index
/// (16 bytes per inner chunk, then their CRC32C) begins in them.
fn copy_with_first_ndvi_shard(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>, usize) {
    let copy = dir.join("copy.zarr");
    copy_dir(&cubes().pixel, &copy);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(copy.join("ndvi/zarr.json")).unwrap()).unwrap();
    let shape = |v: &serde_json::Value| -> Vec<u64> { serde_json::from_value(v.clone()).unwrap() };
    let outer = shape(&meta["chunk_grid"]["configuration"]["chunk_shape"]);
    let inner = shape(&meta["codecs"][0]["configuration"]["chunk_shape"]);
    let per_shard: u64 = outer.iter().zip(&inner).map(|(o, i)| o / i).product();
    let mut files = walk(&copy.join("ndvi/c"));
    files.sort();
    let bytes = std::fs::read(&files[0]).unwrap();
    let index = bytes.len() - (per_shard as usize * 16 + 4);
    (copy, files[0].clone(), bytes, index)
}

/// A chunk its shard does not store (an all-fill chunk, which zarrs leaves out when writing) is all missing
/// in the batches, as zarrs reads it: the loader's own decoding of float32 chunks reads the shard index the
/// same way. Unless the cube's validity index says the chunk has valid values: then it was lost, and that
/// is a read error.
#[test]
fn a_chunk_its_shard_does_not_store_is_missing_as_zarrs_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    // The first ndvi shard: its first inner chunk marked as not stored, the index's CRC32C made to match.
    let (copy, shard, mut bytes, index) = copy_with_first_ndvi_shard(dir.path());
    bytes[index..index + 16].fill(0xFF);
    let checksum = crc32c::crc32c(&bytes[index..bytes.len() - 4]);
    let end = bytes.len();
    bytes[end - 4..].copy_from_slice(&checksum.to_le_bytes());
    std::fs::write(&shard, bytes).unwrap();
    // zarrs now reads that chunk as fill values (the edit took)...
    let ndvi = read_f32(&copy, "ndvi", Some(0..48), 100, 150);
    assert!(ndvi[..8].iter().all(|x| x.is_nan()), "{:?}", &ndvi[..8]);
    assert!(read_f32(cubes().pixel.as_path(), "ndvi", Some(0..48), 100, 150).iter().any(|x| !x.is_nan()));
    // ...which the validity index contradicts: the loader says the chunk was lost...
    let lost = Loader::builder(&copy).shuffle(3).build().unwrap().find_map(Result::err).expect("an error");
    match &lost {
        LoaderError::Read { variable, chunk, message } => {
            assert_eq!((variable.as_str(), chunk), ("ndvi", &[0, 0, 0]));
            assert!(message.contains("not stored, yet the cube's validity index says"), "{message}");
        }
        other => panic!("expected a read error, got {other:?}"),
    }
    // ...and once the index agrees (as for a chunk written all missing), delivers exactly those values.
    let index = array(&copy, "cubeload_index/ndvi");
    index.store_array_subset(&[0..1, 0..1, 0..1], &[0.0f32]).unwrap();
    let batches = collect(Loader::builder(&copy).shuffle(3).build().unwrap());
    assert!(!batches.is_empty());
    assert_cube_values(&copy, &batches);
}

/// A shard whose index is damaged (a flipped bit) or cut short (a truncated file) is a read error naming the
/// shard's file and its index (it said only "the checksum is invalid", naming the cube).
#[test]
fn a_damaged_shard_index_is_named_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let (copy, shard, bytes, index) = copy_with_first_ndvi_shard(dir.path());
    let key = shard.strip_prefix(&copy).unwrap().to_string_lossy().into_owned();
    let mut flipped = bytes.clone();
    flipped[index + 3] ^= 0x10;
    for (damaged, says) in [
        (flipped, "its shard index (its last".to_string()),
        (bytes[..bytes.len() - 100].to_vec(), format!("{key}: ")),
    ] {
        std::fs::write(&shard, &damaged).unwrap();
        let error = Loader::builder(&copy).build().unwrap().find_map(Result::err).expect("an error");
        let LoaderError::Read { variable, message, .. } = &error else { panic!("{error:?}") };
        assert_eq!(variable, "ndvi");
        assert!(message.contains(&format!("{key}: its shard index")) && message.contains(&says), "{message}");
    }
    // Cut shorter than its index, the shard cannot be read at all: zarrs' error ("failed to fill whole
    // buffer") comes with the file's name.
    std::fs::write(&shard, &bytes[..10]).unwrap();
    let error = Loader::builder(&copy).build().unwrap().find_map(Result::err).expect("an error");
    assert!(error.to_string().contains(&format!("{key}: ")), "{error}");
}

/// A shard file lost from a cube: its chunks are not stored, while the validity index says they hold
/// values. A read error naming the variable and chunk, or, with `on_corrupt="skip"`, one batch left out.
#[test]
fn a_lost_shard_file_is_a_read_error_not_missing_values() {
    let dir = tempfile::tempdir().unwrap();
    let (copy, shard, _, _) = copy_with_first_ndvi_shard(dir.path());
    std::fs::remove_file(&shard).unwrap();
    let error = Loader::builder(&copy).build().unwrap().find_map(Result::err).expect("an error");
    let LoaderError::Read { variable, message, .. } = &error else { panic!("{error:?}") };
    assert_eq!(variable, "ndvi");
    assert!(message.contains("not stored, yet the cube's validity index says"), "{message}");
    let mut skipping = Loader::builder(&copy).on_corrupt(OnCorrupt::Skip).build().unwrap();
    let delivered = skipping.by_ref().map(Result::unwrap).count();
    assert!(skipping.corrupt_chunks() >= 1);
    assert_eq!(
        delivered + skipping.corrupt_chunks(),
        Loader::builder(&cubes().pixel).build().unwrap().count()
    );
}

/// A chunk whose checksum is right but whose zstd frame does not make it (the size its header declares
/// changed and the chunk's CRC32C made to match: a writer's bug rather than a flipped bit) is a read error
/// naming the variable and the chunk, found while the batch is assembled from it a block at a time.
#[test]
fn a_frame_that_does_not_make_its_chunk_is_a_read_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (copy, shard, mut bytes, index) = copy_with_first_ndvi_shard(dir.path());
    let per_shard = (bytes.len() - 4 - index) / 16;
    let entry =
        |k: usize, at: usize| u64::from_le_bytes(bytes[index + 16 * k + at..][..8].try_into().unwrap());
    let k = (0..per_shard).find(|&k| entry(k, 0) != u64::MAX).expect("a stored chunk");
    let (offset, length) = (entry(k, 0) as usize, entry(k, 8) as usize);
    // The frame header (RFC 8878, 3.1.1.1): magic, descriptor, window descriptor unless single-segment,
    // dictionary ID, then the content size, whose lowest bit is flipped.
    let frame = &mut bytes[offset..offset + length - 4];
    let descriptor = frame[4];
    let size_field = [usize::from(descriptor & 0x20 != 0), 2, 4, 8][usize::from(descriptor >> 6)];
    assert!(size_field > 0, "zarrs' frames declare their content size");
    let at = 5 + usize::from(descriptor & 0x20 == 0) + [0, 1, 2, 4][usize::from(descriptor & 3)];
    frame[at] ^= 1;
    let checksum = crc32c::crc32c(frame);
    bytes[offset + length - 4..offset + length].copy_from_slice(&checksum.to_le_bytes());
    std::fs::write(&shard, bytes).unwrap();

    let results: Vec<_> = Loader::builder(&copy).build().unwrap().collect();
    let errors: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(errors.len(), 1, "the stream ends at the error");
    match errors[0] {
        LoaderError::Read { variable, message, .. } => {
            assert_eq!(variable, "ndvi");
            assert!(message.contains("copy.zarr") && message.contains("zstd"), "{message}");
            // The shard file and the chunk's bytes in it.
            let key = shard.strip_prefix(&copy).unwrap().to_string_lossy().into_owned();
            let place = format!("{key} bytes {offset}..{}", offset + length);
            assert!(message.contains(&place), "{message}");
        }
        other => panic!("expected a read error, got {other:?}"),
    }
    let mut skipping = Loader::builder(&copy).on_corrupt(OnCorrupt::Skip).build().unwrap();
    let delivered = skipping.by_ref().map(Result::unwrap).count();
    assert_eq!(skipping.corrupt_chunks(), 1);
    assert_eq!(delivered + 1, Loader::builder(&cubes().pixel).build().unwrap().count());
}

#[test]
fn shuffled_cube_batches_are_random_pixels_with_the_tiled_values() {
    let (tiled, cube) = (&cubes().pixel, &cubes().shuffled);
    let ndvi = array(cube, "ndvi");
    assert_eq!(ndvi.dimensionality(), 2, "(sample, time)");
    let meta = crate::util::meta(cube);
    assert_eq!(meta["layout"]["shuffled"], 5);
    assert_eq!(meta["padded_shape"][1], 15_040, "100 × 150 pixels padded to whole batches of 64");
    let (nt, h, w) = (48usize, 100usize, 150usize);
    let t2m = read_f32(tiled, "t2m", Some(0..nt as u64), h as u64, w as u64);
    let ndvi = read_f32(tiled, "ndvi", Some(0..nt as u64), h as u64, w as u64);
    let lat = coordinate(tiled, "lat");
    let lon = coordinate(tiled, "lon");
    let loader = Loader::builder(cube).variables(["t2m", "ndvi"]).build().unwrap();
    let batches = collect(loader);
    let mut seen = HashSet::new();
    for b in &batches {
        assert_eq!(b.shape, vec![64, nt, 2]);
        let mut tiles = HashSet::new();
        for s in 0..b.len() {
            if b.lat[s].is_nan() {
                assert!(
                    b.mask[s * nt * 2..(s + 1) * nt * 2].iter().all(|&m| m == 0),
                    "padding samples are masked"
                );
                continue;
            }
            let y = lat.iter().position(|&v| v == b.lat[s]).unwrap();
            let x = lon.iter().position(|&v| v == b.lon[s]).unwrap();
            assert!(seen.insert((y, x)), "pixel ({y}, {x}) twice");
            tiles.insert((y / 8, x / 8));
            for t in 0..nt {
                let o = (s * nt + t) * 2;
                assert_eq!(b.data[o], t2m[t * h * w + y * w + x]);
                let expected = ndvi[t * h * w + y * w + x];
                if expected.is_nan() {
                    assert_eq!(b.mask[o + 1], 0);
                } else {
                    assert_eq!(b.data[o + 1], expected);
                }
            }
        }
        assert!(
            tiles.len() >= 20 || tiles.is_empty(),
            "samples of a batch come from all over the grid: {}",
            tiles.len()
        );
    }
    assert_eq!(seen.len(), h * w, "every pixel once");
}

/// A shuffled cube's batches, normalized, the same value for value and mask byte for mask byte whether
/// delivered `[B, T, V]` with the static variable repeated along time, `[V, B, T]`, or with the static
/// variable apart (each delivery takes its own path through the loader's assembly).
#[test]
fn shuffled_cube_batches_agree_across_deliveries() {
    let cube = &cubes().shuffled;
    let build = |f: fn(LoaderBuilder) -> LoaderBuilder| {
        collect(f(Loader::builder(cube).normalize(true).fill_value(-9.0)).build().unwrap())
    };
    let interleaved = build(|b| b);
    let variable_major = build(|b| b.variable_major(true));
    let apart = build(|b| b.separate_statics(true));
    assert_eq!(interleaved[0].variables, ["t2m", "ndvi", "landcover"]);
    assert_eq!(apart[0].static_variables, ["landcover"]);
    let (b, nt, nv) = (64, 48, 3);
    let mut missing = 0;
    for ((x, y), z) in interleaved.iter().zip(&variable_major).zip(&apart) {
        assert_eq!((x.shape.as_slice(), y.shape.as_slice()), (&[b, nt, nv][..], &[nv, b, nt][..]));
        for s in 0..b {
            for t in 0..nt {
                for v in 0..nv {
                    let o = (s * nt + t) * nv + v;
                    let (value, valid) = (x.data[o].to_bits(), x.mask[o]);
                    missing += usize::from(valid == 0);
                    assert_eq!(valid == 0, x.data[o] == -9.0, "missing values are filled");
                    let k = (v * b + s) * nt + t;
                    assert_eq!((value, valid), (y.data[k].to_bits(), y.mask[k]), "[V, B, T] at {s} {t} {v}");
                    let expected = if v < 2 {
                        let k = (s * nt + t) * 2 + v;
                        (z.data[k].to_bits(), z.mask[k])
                    } else {
                        let k = s;
                        (z.statics[k].to_bits(), u8::from(z.statics[k] != -9.0))
                    };
                    assert_eq!((value, valid), expected, "statics apart at {s} {t} {v}");
                }
            }
        }
    }
    assert!(missing > 0, "the cube has missing values (padding, gaps)");
}

#[test]
fn same_seed_same_batches_whatever_the_threads() {
    let cube = &cubes().pixel;
    let run = |threads, prefetch| {
        fingerprint(&collect(
            Loader::builder(cube).shuffle(11).epochs(2).threads(threads).prefetch(prefetch).build().unwrap(),
        ))
    };
    let reference = run(0, 1);
    assert_eq!(run(1, 1), reference);
    assert_eq!(run(3, 8), reference);
    assert_ne!(
        fingerprint(&collect(Loader::builder(cube).shuffle(12).epochs(2).build().unwrap())),
        reference
    );
    let epoch0: Vec<_> = reference.iter().filter(|f| f.0 == 0).map(|f| f.2).collect();
    let epoch1: Vec<_> = reference.iter().filter(|f| f.0 == 1).map(|f| f.2).collect();
    assert_ne!(epoch0, epoch1, "each epoch has its own order");
}

/// A loader reads the cube it opened while `gen --overwrite` replaces it: the old cube renamed aside and
/// another put at its path, the loader's batches are still the old cube's (they had been the new cube's
/// chunks under the old metadata); the old cube then deleted, the loader fails rather than read the new one.
#[test]
fn a_loader_reads_the_cube_it_opened_while_gen_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let cube = dir.path().join("cube.zarr");
    copy_dir(&cubes().pixel, &cube);
    let open = |path: &Path| Loader::builder(path).shuffle(3).threads(2).prefetch(2).build().unwrap();
    let expected = fingerprint(&collect(open(&cube)));
    // A cube of the same layout with other values: its t2m chunk files are the ndvi ones.
    let make_other = |other: &Path| {
        copy_dir(&cube, other);
        std::fs::rename(other.join("t2m/c"), other.join("t2m/swap")).unwrap();
        std::fs::rename(other.join("ndvi/c"), other.join("t2m/c")).unwrap();
        std::fs::rename(other.join("t2m/swap"), other.join("ndvi/c")).unwrap();
    };
    let aside = dir.path().join(".cube.zarr.cubeload-old");
    let swap = |new: &Path| {
        std::fs::rename(&cube, &aside).unwrap();
        std::fs::rename(new, &cube).unwrap();
    };
    let other = dir.path().join("other.zarr");
    make_other(&other);
    let mut loader = open(&cube);
    let mut batches = vec![loader.next().unwrap().unwrap()];
    swap(&other);
    batches.extend(loader.map(Result::unwrap));
    assert_eq!(fingerprint(&batches), expected);

    // The cube now at the path (the other one), replaced and deleted while read.
    let expected_other = fingerprint(&collect(open(&cube)));
    assert_ne!(expected_other, expected);
    let third = dir.path().join("third.zarr");
    copy_dir(&cubes().pixel, &third);
    let mut loader = open(&cube);
    let first = loader.next().unwrap().unwrap();
    std::fs::remove_dir_all(&aside).unwrap();
    swap(&third);
    std::fs::remove_dir_all(&aside).unwrap();
    let mut delivered = vec![first];
    let mut failed = None;
    for batch in loader {
        match batch {
            Ok(batch) => delivered.push(batch),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let Some(LoaderError::CubeDeleted { path }) = failed else { panic!("{failed:?}") };
    assert_eq!(path, cube, "the error names the cube, not the handle it was read through");
    assert_eq!(fingerprint(&delivered), expected_other[..delivered.len()]);
    // Skipping corrupt chunks does not skip what the deletion took: the loader fails the same way.
    let fourth = dir.path().join("fourth.zarr");
    copy_dir(&cubes().pixel, &fourth);
    let mut loader =
        Loader::builder(&cube).shuffle(3).threads(2).prefetch(2).on_corrupt(OnCorrupt::Skip).build().unwrap();
    loader.next().unwrap().unwrap();
    swap(&fourth);
    std::fs::remove_dir_all(&aside).unwrap();
    let failed = loader.find_map(Result::err);
    assert!(matches!(failed, Some(LoaderError::CubeDeleted { .. })), "{failed:?}");
}

/// Batches given back are made again in their memory, and what it held never shows through: buffers of
/// the batch's size filled with other values, given back first, are taken by the loader, and every batch of
/// loaders whose batches are all given back is the batch of a loader whose batches are dropped, bit for bit.
#[test]
fn batches_given_back_are_made_again_in_their_memory() {
    use cubeload::loader::buffers::{MIN_BYTES, give_back};
    let cube = &cubes().wide;
    let loader = |threads| Loader::builder(cube).shuffle(4).epochs(2).threads(threads).prefetch(2).build();
    let reference = collect(loader(2).unwrap());
    let cells = reference[0].data.len();
    assert!(reference[0].mask.len() >= MIN_BYTES, "the cube's masks are large enough to be kept");
    // Only this test's loaders make batches of this size: nothing else takes these buffers.
    let mut poisoned = HashSet::new();
    for _ in 0..4 {
        let (data, mask) = (vec![f32::from_bits(0x7fc0_dead); cells], vec![7u8; cells]);
        poisoned.insert(data.as_ptr() as usize);
        give_back(data);
        give_back(mask);
    }
    let mut made_in_poisoned = 0;
    for threads in [2, 0] {
        let batches = loader(threads).unwrap();
        let mut delivered = 0;
        for (batch, expected) in batches.zip(&reference) {
            let batch = batch.unwrap();
            assert_eq!(batch.origin, expected.origin);
            assert_eq!(
                fingerprint(std::slice::from_ref(&batch)),
                fingerprint(std::slice::from_ref(expected))
            );
            assert!(batch.mask == expected.mask, "mask of batch {:?}", batch.origin);
            made_in_poisoned += usize::from(poisoned.contains(&(batch.data.as_ptr() as usize)));
            delivered += 1;
            batch.recycle();
        }
        assert_eq!(delivered, reference.len());
    }
    assert!(made_in_poisoned > 0, "no batch was made in a buffer given back");
}

/// By default the readers may hold 32 MiB of batches ready (4 to 1024 batches): dozens of small ones, so that
/// they need not wait for a consumer that runs late; a depth given is kept.
#[test]
fn the_default_prefetch_depth_holds_32_mib_of_batches() {
    use cubeload::loader::{MAX_PREFETCH, MIN_PREFETCH, PREFETCH_BYTES, default_prefetch};
    for cube in [&cubes().pixel, &cubes().image] {
        let mut loader = Loader::builder(cube).shuffle(3).build().unwrap();
        let depth = loader.prefetch_depth();
        let batch = loader.next().unwrap().unwrap();
        let bytes = batch.data.len() * size_of::<f32>() + batch.mask.len();
        assert_eq!(depth, default_prefetch(bytes), "{}", cube.display());
        let given = Loader::builder(cube).prefetch(3).build().unwrap();
        assert_eq!(given.prefetch_depth(), 3);
        assert_eq!(collect(given).len(), loader.batches_per_epoch(), "every batch with a depth of 3");
    }
    // The most batches that 32 MiB hold, within the bounds.
    for bytes in [1, 20_000, 46_080, 368_640, 2_580_480, PREFETCH_BYTES / 10, PREFETCH_BYTES, 100 << 20] {
        let depth = default_prefetch(bytes);
        assert!((MIN_PREFETCH..=MAX_PREFETCH).contains(&depth), "{bytes} B: {depth}");
        assert!(depth * bytes <= PREFETCH_BYTES || depth == MIN_PREFETCH, "{bytes} B: {depth}");
        assert!((depth + 1) * bytes > PREFETCH_BYTES || depth == MAX_PREFETCH, "{bytes} B: {depth}");
    }
    assert_eq!(default_prefetch(368_640), 91, "4 image sequences of 24 × 16 × 16 × 3");
    assert!(Loader::builder(&cubes().pixel).prefetch(0).build().is_err(), "a depth of 0 is refused");
}

#[test]
fn resume_delivers_exactly_the_remaining_batches() {
    let cube = &cubes().pixel;
    let full = fingerprint(&collect(Loader::builder(cube).shuffle(5).epochs(3).mix(3).build().unwrap()));
    for stop_after in [0, 1, 4, 16, full.len() / 2, full.len() - 1] {
        let mut first = Loader::builder(cube).shuffle(5).epochs(3).mix(3).threads(2).build().unwrap();
        let head: Vec<Batch> = first.by_ref().take(stop_after).map(Result::unwrap).collect();
        let state = first.state();
        drop(first);
        let json = serde_json::to_string(&state).unwrap();
        let state = serde_json::from_str(&json).unwrap();
        let rest = collect(Loader::builder(cube).epochs(3).resume(state).build().unwrap());
        let mut joined = fingerprint(&head);
        joined.extend(fingerprint(&rest));
        assert_eq!(joined, full, "stopped after {stop_after}");
    }
    // A state past the epochs asked is refused rather than resumed into nothing.
    let mut first = Loader::builder(cube).shuffle(5).epochs(3).build().unwrap();
    let per_epoch = first.batches_per_epoch();
    first.by_ref().take(per_epoch + 1).for_each(|b| drop(b.unwrap()));
    let error = Loader::builder(cube).epochs(1).resume(first.state()).build().unwrap_err().to_string();
    assert!(error.contains("at epoch 1") && error.contains("past the 1 epochs asked"), "{error}");
}

/// A loader option under test.
type Setting = fn(LoaderBuilder) -> LoaderBuilder;

#[test]
fn a_state_resumes_only_the_batches_it_was_saved_for() {
    let cubes = cubes();
    let mut first = Loader::builder(&cubes.pixel).shuffle(5).epochs(2).build().unwrap();
    first.by_ref().take(3).for_each(|b| drop(b.unwrap()));
    let state = first.state();
    let per_epoch = first.batches_per_epoch();
    drop(first);
    let refused = |builder: LoaderBuilder| {
        let error = builder.epochs(2).resume(state).build().unwrap_err().to_string();
        assert!(error.contains("another cube, or with other variables or another min_valid"), "{error}");
    };
    // Another cube (the same inputs, other batches), other variables, another threshold.
    refused(Loader::builder(&cubes.wide));
    refused(Loader::builder(&cubes.pixel).variables(["t2m"]));
    refused(Loader::builder(&cubes.pixel).min_valid(0.99));
    // The options a state carries, given before or after `resume`: refused where they disagree with it
    // (the loader would deliver other batches: another order, other samples mixed, another share), taken
    // where they agree.
    let disagreeing: [(Setting, &str); 6] = [
        (|b| b.shuffle(99), "seed 99"),
        (|b| b.seed(6), "seed 6"),
        (|b| b.mix(2), "mix(2)"),
        (|b| b.shard(1, 2), "shard(1, 2)"),
        (|b| b.worker(0, 2), "worker(0, 2)"),
        (|b| b.shard(0, 1).mix(1).shuffle(7), "seed 7"),
    ];
    for (option, named) in disagreeing {
        let after = option(Loader::builder(&cubes.pixel).epochs(2).resume(state));
        let before = option(Loader::builder(&cubes.pixel).epochs(2)).resume(state);
        for builder in [after, before] {
            let error = builder.build().map(|_| ()).unwrap_err().to_string();
            assert!(error.contains(named) && error.contains("disagrees with the resume state"), "{error}");
            assert!(!error.contains("  "), "one space between words: {error}");
        }
    }
    let unshuffled = cubeload::loader::LoaderState { shuffle: false, ..state };
    let error = Loader::builder(&cubes.pixel).resume(unshuffled).shuffle(5).build().map(|_| ()).unwrap_err();
    assert!(error.to_string().contains("saved with no shuffle"), "{error}");
    let rest = |builder: LoaderBuilder| fingerprint(&collect(builder.build().unwrap()));
    let plain = rest(Loader::builder(&cubes.pixel).epochs(2).resume(state));
    assert_eq!(plain.len(), 2 * per_epoch - 3);
    let agreeing = Loader::builder(&cubes.pixel).epochs(2).resume(state).shuffle(5).shard(0, 1).mix(1);
    assert_eq!(rest(agreeing), plain);
    assert_eq!(rest(Loader::builder(&cubes.pixel).seed(5).worker(0, 1).epochs(2).resume(state)), plain);

    // A state of an earlier version, without a digest, is taken as it is.
    let old = cubeload::loader::LoaderState { digest: None, ..state };
    let resumed = collect(Loader::builder(&cubes.pixel).epochs(2).resume(old).build().unwrap());
    assert_eq!(resumed.len(), 2 * per_epoch - 3);
    // Unless it mixed across several workers or ranks, whose groups this version makes differently.
    for (workers, world_size) in [(2, 1), (1, 2)] {
        let old = cubeload::loader::LoaderState { digest: None, mix: 3, workers, world_size, ..state };
        let error = Loader::builder(&cubes.pixel).epochs(2).resume(old).build().unwrap_err().to_string();
        assert!(error.contains("saved by an earlier version with mixing"), "{error}");
    }

    // A cursor at the end of an epoch is the next one's start: no batch of it is lost.
    let end = cubeload::loader::LoaderState { epoch: 0, cursor: per_epoch, ..state };
    let next = cubeload::loader::LoaderState { epoch: 1, cursor: 0, ..state };
    let from_end =
        fingerprint(&collect(Loader::builder(&cubes.pixel).epochs(2).resume(end).build().unwrap()));
    let from_next =
        fingerprint(&collect(Loader::builder(&cubes.pixel).epochs(2).resume(next).build().unwrap()));
    assert_eq!(from_end.len(), per_epoch);
    assert_eq!(from_end, from_next);
}

/// The workers of a rank (DataLoader's `num_workers`) take whole groups of mixed chunks: a batch's samples
/// and position are the same whatever their number, and a worker resumes its own share.
#[test]
fn mixed_batches_are_the_same_whatever_the_workers() {
    let cube = &cubes().pixel;
    let build = |worker, workers| Loader::builder(cube).shuffle(3).epochs(2).mix(3).worker(worker, workers);
    let mut alone = fingerprint(&collect(build(0, 1).build().unwrap()));
    for workers in [2, 3, 4] {
        let mut joined = Vec::new();
        for worker in 0..workers {
            let batches = collect(build(worker, workers).build().unwrap());
            // Resumed after its third batch, a worker delivers the rest of its own share.
            let mut first = build(worker, workers).build().unwrap();
            first.by_ref().take(3).for_each(|b| drop(b.unwrap()));
            let rest = collect(build(worker, workers).resume(first.state()).build().unwrap());
            assert_eq!(fingerprint(&rest), fingerprint(&batches[3..]), "worker {worker} of {workers}");
            joined.extend(fingerprint(&batches));
        }
        joined.sort_unstable();
        alone.sort_unstable();
        assert_eq!(joined, alone, "{workers} workers");
    }
}

#[test]
fn ranks_get_disjoint_equal_shares() {
    let cube = &cubes().pixel;
    let world = 3;
    let per_rank: Vec<Vec<Batch>> = (0..world)
        .map(|rank| collect(Loader::builder(cube).shuffle(9).epochs(2).shard(rank, world).build().unwrap()))
        .collect();
    let total = Loader::builder(cube).build().unwrap().batches_per_epoch();
    for epoch in 0..2 {
        let mut seen = HashSet::new();
        for batches in &per_rank {
            let mine: Vec<_> = batches.iter().filter(|b| b.origin.epoch == epoch).collect();
            assert_eq!(mine.len(), total / world, "equal counts");
            for b in mine {
                assert!(seen.insert(b.origin.chunk), "chunk {:?} on two ranks", b.origin.chunk);
            }
        }
        assert_eq!(seen.len(), total - total % world);
    }
}

#[test]
fn mixing_spreads_samples_across_chunks_and_keeps_coverage() {
    let cube = &cubes().pixel;
    let batches = collect(Loader::builder(cube).shuffle(1).mix(4).build().unwrap());
    let mut seen = HashSet::new();
    let mut tiles_per_batch = Vec::new();
    for b in &batches {
        // The 8 × 8 tile (chunk) each sample comes from, from its cell position on the 0.01° grid.
        let tiles: HashSet<(i64, i64)> = b
            .lat
            .iter()
            .zip(&b.lon)
            .map(|(la, lo)| (((46.0 - la) / 0.01).floor() as i64 / 8, ((lo - 9.5) / 0.01).floor() as i64 / 8))
            .collect();
        tiles_per_batch.push(tiles.len());
        for (la, lo) in b.lat.iter().zip(&b.lon) {
            assert!(seen.insert((la.to_bits(), lo.to_bits())), "sample twice");
        }
    }
    assert_eq!(seen.len(), batches.len() * 64);
    assert_cube_values(cube, &batches);
    // Groups of 4 chunks: every batch but those of a last, single-chunk group mixes several tiles.
    let full_groups = batches.len() / 4 * 4;
    assert!(tiles_per_batch[..full_groups].iter().all(|&n| n >= 2), "{tiles_per_batch:?}");
    let plain = collect(Loader::builder(cube).shuffle(1).build().unwrap());
    assert!(
        plain.iter().all(|b| b.lat.iter().zip(&b.lon).all(|(la, lo)| {
            let tile = |la: f64, lo: f64| {
                (((46.0 - la) / 0.01).floor() as i64 / 8, ((lo - 9.5) / 0.01).floor() as i64 / 8)
            };
            tile(*la, *lo) == tile(b.lat[0], b.lon[0])
        })),
        "without mixing a batch is one tile"
    );
}

/// Every sample of `batches`, sorted: where and when it is (lat, lon, first step), its values and mask bytes
/// (every variable's rows, `[V, B, …]` or `[B, …]`) and its statics. (The padding samples of a shuffled cube
/// share a NaN position and their fill values.)
pub(crate) type Sample = ((u64, u64, usize), Vec<u32>, Vec<u8>, Vec<u32>);

pub(crate) fn samples_of(batches: &[Batch]) -> Vec<Sample> {
    let mut samples = Vec::new();
    for b in batches {
        let n = b.len();
        let outer = if b.variable_major { b.shape[0] } else { 1 };
        let (cell, scell) = (b.data.len() / n / outer, b.statics.len() / n);
        for s in 0..n {
            let rows = |o: usize| (o * n + s) * cell..(o * n + s + 1) * cell;
            let data = (0..outer).flat_map(|o| b.data[rows(o)].iter().map(|x| x.to_bits())).collect();
            let mask = (0..outer).flat_map(|o| b.mask[rows(o)].iter().copied()).collect();
            let statics = b.statics[s * scell..(s + 1) * scell].iter().map(|x| x.to_bits()).collect();
            samples.push(((b.lat[s].to_bits(), b.lon[s].to_bits(), b.time_index[s]), data, mask, statics));
        }
    }
    samples.sort();
    samples
}

/// Mixing only moves samples: an epoch of batches mixed across chunks holds exactly the samples of the same
/// epoch unmixed, every value and mask byte, in every layout and arrangement (the slow obvious reference
/// being the loader without mixing, itself compared with the cube above).
#[test]
fn mixed_batches_hold_the_samples_of_unmixed_ones() {
    type Arrange = fn(LoaderBuilder) -> LoaderBuilder;
    let c = cubes();
    let arrangements: [(&str, Arrange); 4] = [
        ("plain", |b| b),
        ("variable-major", |b| b.variable_major(true)),
        ("separate statics", |b| b.separate_statics(true)),
        ("normalized, fill -1", |b| b.normalize(true).fill_value(-1.0)),
    ];
    for cube in [&c.pixel, &c.image, &c.shuffled] {
        for (name, arrange) in arrangements {
            let epoch =
                |mix: usize| collect(arrange(Loader::builder(cube).shuffle(2).mix(mix)).build().unwrap());
            let (plain, mixed) = (epoch(1), epoch(3));
            assert_eq!(plain.len(), mixed.len());
            assert!(mixed.iter().zip(&plain).all(|(m, p)| m.shape == p.shape), "{name}: shapes");
            assert!(
                mixed.iter().zip(&plain).any(|(m, p)| m.lat != p.lat || m.lon != p.lon),
                "{name}: {} was mixed",
                cube.display()
            );
            assert!(samples_of(&mixed) == samples_of(&plain), "{name}: {} samples differ", cube.display());
        }
    }
}

#[test]
fn image_sequences_are_patches_of_the_cube() {
    let cube = &cubes().image;
    let batches = collect(Loader::builder(cube).variables(["ndvi", "t2m"]).build().unwrap());
    let (h, w) = (100usize, 150usize);
    let t2m = read_f32(cube, "t2m", Some(0..48), h as u64, w as u64);
    let lat = coordinate(cube, "lat");
    let lon = coordinate(cube, "lon");
    assert!(!batches.is_empty());
    for b in &batches {
        assert_eq!(b.shape, vec![4, 8, 2, 8, 8]);
        let [it, iy, ix] = b.origin.chunk;
        for s in 0..4 {
            let (y0, x0) = (iy * 16 + s / 2 * 8, ix * 16 + s % 2 * 8);
            assert!(((lat[y0 + 3] + lat[y0 + 4]) / 2.0 - b.lat[s]).abs() < 1e-9);
            assert!(((lon[x0 + 3] + lon[x0 + 4]) / 2.0 - b.lon[s]).abs() < 1e-9);
            for t in 0..8 {
                for (py, px) in [(0, 0), (3, 5), (7, 7)] {
                    let (y, x, tt) = (y0 + py, x0 + px, it * 8 + t);
                    let o = (((s * 8 + t) * 2 + 1) * 8 + py) * 8 + px;
                    if y < h && x < w && tt < 48 {
                        assert_eq!(b.data[o], t2m[tt * h * w + y * w + x]);
                    } else {
                        assert_eq!(b.mask[o], 0);
                    }
                }
            }
        }
    }
}

/// Every element of image-sequence batches, every variable (the static land cover repeated along time):
/// the cube's value as zarrs reads it, or fill 0 and mask 0; variable-major batches hold the same values
/// transposed, and statics returned separately are the land cover's patches.
#[test]
fn image_sequence_batches_hold_every_cube_value() {
    let cube = &cubes().image;
    let (nt, h, w, b, s_len, p) = (48usize, 100usize, 150usize, 4usize, 8usize, 8usize);
    let t2m = read_f32(cube, "t2m", Some(0..nt as u64), h as u64, w as u64);
    let ndvi = read_f32(cube, "ndvi", Some(0..nt as u64), h as u64, w as u64);
    let lc = array(cube, "landcover").retrieve_array_subset::<Vec<u8>>(&[0..h as u64, 0..w as u64]).unwrap();
    let value = |v: usize, t: usize, y: usize, x: usize| -> f32 {
        if y >= h || x >= w || t >= nt {
            return f32::NAN;
        }
        match v {
            0 => t2m[t * h * w + y * w + x],
            1 => ndvi[t * h * w + y * w + x],
            _ => f32::from(lc[y * w + x]),
        }
    };
    let expect = |x: f32| if x.is_nan() { (0.0, 0) } else { (x, 1) };
    let plain = collect(Loader::builder(cube).build().unwrap());
    let vmajor = collect(Loader::builder(cube).variable_major(true).build().unwrap());
    let separate = collect(Loader::builder(cube).separate_statics(true).build().unwrap());
    assert!(!plain.is_empty());
    for ((a, m), st) in plain.iter().zip(&vmajor).zip(&separate) {
        assert_eq!(a.variables, ["t2m", "ndvi", "landcover"]);
        assert_eq!((a.shape.clone(), m.shape.clone()), (vec![b, s_len, 3, p, p], vec![3, b, s_len, p, p]));
        assert_eq!(
            (st.variables.clone(), st.static_variables.clone()),
            (vec!["t2m".to_string(), "ndvi".to_string()], vec!["landcover".to_string()])
        );
        let [it, iy, ix] = a.origin.chunk;
        for s in 0..b {
            let (y0, x0) = (iy * 16 + s / 2 * p, ix * 16 + s % 2 * p);
            for (py, px) in (0..p).flat_map(|py| (0..p).map(move |px| (py, px))) {
                let (y, x) = (y0 + py, x0 + px);
                for t in 0..s_len {
                    for v in 0..3 {
                        let e = expect(value(v, it * s_len + t, y, x));
                        let o = (((s * s_len + t) * 3 + v) * p + py) * p + px;
                        assert_eq!(
                            (a.data[o], a.mask[o]),
                            e,
                            "{:?} sample {s} t {t} var {v} ({py}, {px})",
                            a.origin
                        );
                        let o = (((v * b + s) * s_len + t) * p + py) * p + px;
                        assert_eq!((m.data[o], m.mask[o]), e, "variable-major");
                        if v < 2 {
                            let o = (((s * s_len + t) * 2 + v) * p + py) * p + px;
                            assert_eq!((st.data[o], st.mask[o]), e, "with separate statics");
                        }
                    }
                }
                let lc_value = value(2, 0, y, x);
                let want = if lc_value.is_nan() { 0.0 } else { lc_value };
                assert_eq!(st.statics[(s * p + py) * p + px], want, "static patch");
            }
        }
    }
}

#[test]
fn normalization_uses_the_stored_statistics() {
    let cube = &cubes().pixel;
    let meta = Loader::builder(cube).build().unwrap().meta().clone();
    let stats = meta.variables[0].stats.unwrap();
    let raw = collect(Loader::builder(cube).variables(["t2m", "landcover"]).build().unwrap());
    let norm =
        collect(Loader::builder(cube).variables(["t2m", "landcover"]).normalize(true).build().unwrap());
    for (r, n) in raw.iter().zip(&norm) {
        for i in (0..r.data.len()).step_by(97) {
            if r.mask[i] == 0 {
                continue;
            }
            if i % 2 == 0 {
                let expected = (r.data[i] - stats.mean as f32) / stats.std as f32;
                assert!((n.data[i] - expected).abs() < 1e-5);
            } else {
                assert_eq!(n.data[i], r.data[i], "categorical values are not normalized");
            }
        }
    }
}

#[test]
fn static_variables_can_come_separately() {
    let cube = &cubes().pixel;
    let b = Loader::builder(cube).separate_statics(true).build().unwrap().next().unwrap().unwrap();
    assert_eq!(b.variables, ["t2m", "ndvi"]);
    assert_eq!(b.static_variables, ["landcover"]);
    assert_eq!(b.shape, vec![64, 48, 2]);
    assert_eq!(b.statics.len(), 64);
}

#[test]
fn dropping_mid_epoch_stops_the_readers() {
    let cube = &cubes().pixel;
    for threads in [1, 4] {
        let mut loader = Loader::builder(cube).epochs(1000).threads(threads).prefetch(2).build().unwrap();
        loader.next().unwrap().unwrap();
        drop(loader); // joins every reader: a hang here fails the test run
    }
}

/// Replaces `variable`'s chunk files of a copy of `cube` by named pipes nobody writes to: a reader opening
/// one waits, as on a stalled store. Returns the copy's directory and the pipes.
fn stalled_copy(cube: &Path, variable: &str) -> (tempfile::TempDir, PathBuf, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("stalled.zarr");
    copy_dir(cube, &copy);
    let pipes: Vec<PathBuf> =
        walk(&copy.join(variable).join("c")).into_iter().filter(|p| p.is_file()).collect();
    assert!(!pipes.is_empty());
    for pipe in &pipes {
        std::fs::remove_file(pipe).unwrap();
        let name = std::ffi::CString::new(pipe.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; mkfifo reads it only.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo {}", pipe.display());
    }
    (dir, copy, pipes)
}

/// Opens and closes each pipe for writing until `stop`: a reader waiting on one then reads it empty.
fn release(
    pipes: Vec<PathBuf>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for pipe in &pipes {
                // Fails (ENXIO) while no reader has the pipe open.
                let _ = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(pipe);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    })
}

#[test]
fn a_wait_on_a_stalled_store_times_out_losing_nothing_and_dropping_does_not_hang() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let (_dir, cube, pipes) = stalled_copy(&cubes().pixel, "t2m");

    // The batch the reader cannot read times out, and is still the next one once the store answers: the
    // pipes read empty, which is a chunk cut short, an error naming t2m.
    let mut loader = Loader::builder(&cube).threads(1).build().unwrap();
    assert!(loader.next_within(Duration::from_millis(300)).is_err(), "a batch came from a stalled store");
    let stop = Arc::new(AtomicBool::new(false));
    let releaser = release(pipes.clone(), stop.clone());
    let first = loader.next_within(Duration::from_mins(1)).expect("the batch after the store answered");
    let error = first.expect("the stream goes on").expect_err("a chunk read empty is an error");
    assert!(error.to_string().contains("t2m"), "{error}");
    stop.store(true, Ordering::Relaxed);
    releaser.join().unwrap();
    drop(loader);

    // Dropped while its reader waits on the store, a loader returns after the grace period, leaving the
    // reader to end on its own.
    let mut loader = Loader::builder(&cube).threads(1).build().unwrap();
    assert!(loader.next_within(Duration::from_millis(300)).is_err(), "a batch came from a stalled store");
    let started = Instant::now();
    drop(loader);
    let waited = started.elapsed();
    assert!(
        waited >= cubeload::loader::DROP_GRACE
            && waited < cubeload::loader::DROP_GRACE + Duration::from_secs(5),
        "dropping took {waited:?}"
    );
    // Tidying: the reader left waiting is let go (it reads a pipe empty and ends).
    let stop = Arc::new(AtomicBool::new(false));
    let releaser = release(pipes, stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    releaser.join().unwrap();
}

/// `min_valid` against the cube's values: a batch's fraction of valid values is over its cells inside the
/// cube, averaged over the variables (edge batches full of values were skipped as mostly padding).
#[test]
fn min_valid_is_the_valid_fraction_of_a_batchs_cells_inside_the_cube() {
    let cube = &cubes().pixel;
    let meta = crate::util::meta(cube);
    let [t_n, h, w] = ["time", "lat", "lon"].map(|axis| {
        meta["shape"][["time", "lat", "lon"].iter().position(|a| *a == axis).unwrap()].as_u64().unwrap()
            as usize
    });
    let [ct, cy, cx] =
        ["chunk_t", "chunk_y", "chunk_x"].map(|k| meta["layout"][k].as_u64().unwrap() as usize);
    let padded = |n: usize, c: usize| n.div_ceil(c) * c;
    assert!(padded(h, cy) > h || padded(w, cx) > w, "the test needs edge batches with padding");
    // Each variable's fraction of valid values in every batch chunk, over the cells inside the cube.
    let fractions = |name: &str| -> HashMap<[usize; 3], f64> {
        let values =
            read_f32(cube, name, Some(0..padded(t_n, ct) as u64), padded(h, cy) as u64, padded(w, cx) as u64);
        let (ph, pw) = (padded(h, cy), padded(w, cx));
        let mut out = HashMap::new();
        for it in 0..padded(t_n, ct) / ct {
            for iy in 0..ph / cy {
                for ix in 0..pw / cx {
                    let (mut valid, mut inside) = (0usize, 0usize);
                    for t in it * ct..((it + 1) * ct).min(t_n) {
                        for y in iy * cy..((iy + 1) * cy).min(h) {
                            for x in ix * cx..((ix + 1) * cx).min(w) {
                                inside += 1;
                                valid += usize::from(!values[(t * ph + y) * pw + x].is_nan());
                            }
                        }
                    }
                    out.insert([it, iy, ix], valid as f64 / inside as f64);
                }
            }
        }
        out
    };
    let (t2m, ndvi) = (fractions("t2m"), fractions("ndvi"));
    assert!(t2m.values().all(|f| *f == 1.0), "t2m is valid everywhere in the demo");
    let mean = |variables: &[&str], id: &[usize; 3]| {
        variables.iter().map(|v| if *v == "t2m" { t2m[id] } else { ndvi[id] }).sum::<f64>()
            / variables.len() as f64
    };
    // Thresholds between the fractions the batches have (none on a batch's own fraction, where the
    // index's float32 could fall either side), a quarter, half and nine tenths of the way up them.
    let between = |variables: &[&str]| -> Vec<f64> {
        let mut seen: Vec<f64> = t2m.keys().map(|id| mean(variables, id)).filter(|f| *f > 0.0).collect();
        seen.sort_by(f64::total_cmp);
        seen.dedup();
        [0.25, 0.5, 0.9]
            .iter()
            .map(|q| ((seen.len() - 1) as f64 * q) as usize)
            .map(|k| (seen[k] + seen[k + 1]) / 2.0)
            .collect()
    };
    let cases: Vec<(Vec<&str>, f64)> = std::iter::once((vec!["t2m"], 0.5))
        .chain(between(&["ndvi"]).into_iter().map(|f| (vec!["ndvi"], f)))
        .chain(between(&["t2m", "ndvi"]).into_iter().map(|f| (vec!["t2m", "ndvi"], f)))
        .collect();
    for (variables, threshold) in cases {
        let expected: HashSet<[usize; 3]> =
            t2m.keys().filter(|id| mean(&variables, id) >= threshold).copied().collect();
        let delivered: HashSet<[usize; 3]> =
            collect(Loader::builder(cube).variables(variables.clone()).min_valid(threshold).build().unwrap())
                .iter()
                .map(|b| b.origin.chunk)
                .collect();
        let (extra, missing): (Vec<_>, Vec<_>) =
            (delivered.difference(&expected).collect(), expected.difference(&delivered).collect());
        assert!(
            extra.is_empty() && missing.is_empty(),
            "{variables:?} at {threshold}: {extra:?} delivered, {missing:?} not"
        );
    }
}

/// A batch full of values reaches `min_valid(1.0)` also where the cube pads it (the index's float32 share
/// of a padded chunk, scaled up, fell just short of 1); and a resume state saved by a version that took the
/// share over the whole chunk, padding included, continues the batches it chose then.
#[test]
fn full_edge_batches_reach_min_valid_1_and_states_of_the_earlier_rule_resume() {
    use cubeload::loader::sampler::{Sampler, Share};
    let dir = tempfile::tempdir().unwrap();
    let spec = cubeload::demo::DemoSpec { hours: 48, ..Default::default() };
    // 48 steps in windows of 29: the last time chunk holds 19 of 29 (19/29 in float32, scaled by 29/19, is
    // under 1).
    let text = cubeload::demo::write_inputs(dir.path(), &spec).unwrap().replace(
        "layout: { kind: pixel_series, batch: 256 }",
        "layout: { kind: pixel_series, batch: 64, window: 29 }",
    );
    assert!(text.contains("window: 29"));
    let plan = Plan::new(Config::from_yaml(&text, Path::new("test.yaml")).unwrap(), text.clone()).unwrap();
    let cube = generate(&plan, &GenOptions::default(), &|_, _| {}).unwrap().path;
    let all = Loader::builder(&cube).variables(["t2m"]).build().unwrap().batches_per_epoch();
    let full = Loader::builder(&cube).variables(["t2m"]).min_valid(1.0).build().unwrap().batches_per_epoch();
    assert_eq!(full, all, "t2m has values everywhere: every batch is full");

    // The earlier rule: the stored share of the whole chunk, as read from the index.
    let index = array(&cube, "cubeload_index/t2m");
    let shape = index.shape().to_vec();
    let stored =
        index.retrieve_array_subset::<Vec<f32>>(&shape.iter().map(|&n| 0..n).collect::<Vec<_>>()).unwrap();
    let [ct, cy, cx] = [shape[0] as usize, shape[1] as usize, shape[2] as usize];
    let before: Vec<[usize; 3]> = (0..ct * cy * cx)
        .filter(|&i| stored[i] >= 0.5)
        .map(|i| [i / (cy * cx), (i / cx) % cy, i % cx])
        .collect();
    assert!(before.len() < all, "the earlier rule left out padded batches");
    let share = Share { rank: 0, world_size: 1, worker: 0, workers: 1 };
    let sampler = Sampler::new(before.clone(), 7, true, share, 1);
    let state = cubeload::loader::LoaderState {
        seed: 7,
        shuffle: true,
        epoch: 0,
        cursor: 3,
        rank: 0,
        world_size: 1,
        worker: 0,
        workers: 1,
        mix: 1,
        digest: Some(sampler.digest(&["t2m"])),
    };
    let at_half = || Loader::builder(&cube).variables(["t2m"]).min_valid(0.5);
    let chunks =
        |loader: Loader| -> Vec<[usize; 3]> { collect(loader).iter().map(|b| b.origin.chunk).collect() };
    assert_eq!(chunks(at_half().resume(state).build().unwrap()), sampler.epoch_order(0)[3..].to_vec());
    // Its state, saved again, resumes the same batches again (it carries the earlier rule's digest).
    let mut again = at_half().resume(state).build().unwrap();
    again.by_ref().take(2).for_each(|b| drop(b.unwrap()));
    let later = again.state();
    assert_eq!(later.digest, state.digest);
    let rest = chunks(at_half().resume(later).build().unwrap());
    assert_eq!(rest, sampler.epoch_order(0)[5..].to_vec());
    // Without min_valid both rules choose the same batches: such a digest is this loader's or refused.
    let error = Loader::builder(&cube).variables(["t2m"]).resume(state).build().map(|_| ()).unwrap_err();
    assert!(error.to_string().contains("the resume state was saved on another cube"), "{error}");
}

#[test]
fn options_that_leave_no_batch_or_make_no_sense_are_refused() {
    let cube = &cubes().pixel;
    let refused = |builder: LoaderBuilder, says: &str| {
        let err = builder.build().map(|_| ()).unwrap_err();
        assert!(matches!(err, LoaderError::Invalid(_)) && err.to_string().contains(says), "{err}");
    };
    for fraction in [f64::NAN, 2.0, -0.1] {
        refused(Loader::builder(cube).min_valid(fraction), "a fraction of valid values, 0 to 1");
    }
    refused(Loader::builder(cube).variables(["t2m", "ndvi", "t2m"]), "variable `t2m` asked twice");
    // Each option named by itself (prefetch and mix shared one message), and no epoch is no batch.
    refused(Loader::builder(cube).prefetch(0), "prefetch 0");
    refused(Loader::builder(cube).mix(0), "mix 0");
    refused(Loader::builder(cube).epochs(0), "epochs 0");
    // Epochs past what the machine counts: in a release build the product wrapped (one batch was delivered).
    let jobs = Loader::builder(cube).build().unwrap().batches_per_epoch();
    refused(Loader::builder(cube).epochs(usize::MAX / jobs + 1), "more in all than this machine can count");
    // The demo's NDVI has cloud gaps in every batch: no batch is wholly valid.
    let batches = Loader::builder(cube).build().unwrap().batches_per_epoch();
    refused(Loader::builder(cube).min_valid(1.0), &format!("none of the {batches} batches holding data"));
    // More ranks than batches would give each none; as many ranks as batches give each one.
    refused(Loader::builder(cube).shard(0, batches + 1), &format!("an epoch has {batches} batches"));
    for rank in [0, batches - 1] {
        assert_eq!(collect(Loader::builder(cube).shard(rank, batches).build().unwrap()).len(), 1);
    }
    // A prefetch depth past the whole run reads ahead as far as the run goes, without room for the rest, and
    // readers past one per batch of the run are not started.
    assert_eq!(collect(Loader::builder(cube).prefetch(1 << 40).build().unwrap()).len(), batches);
    assert_eq!(collect(Loader::builder(cube).threads(1 << 40).build().unwrap()).len(), batches);
}

#[test]
fn a_damaged_validity_index_is_an_error_not_fewer_batches() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.zarr");
    copy_dir(&cubes().pixel, &copy);
    // Zeros over the first fractions of t2m's index: read as they are, those batches would leave every epoch.
    let index = copy.join("cubeload_index/t2m/c/0/0/0");
    let mut bytes = std::fs::read(&index).unwrap();
    bytes[..16].fill(0);
    std::fs::write(&index, bytes).unwrap();
    let err = Loader::builder(&copy).build().map(|_| ()).unwrap_err();
    assert!(matches!(err, LoaderError::Read { .. }), "{err}");
    assert!(err.to_string().contains("cubeload_index/t2m") && err.to_string().contains("checksum"), "{err}");
    // Lost, it would read as its fill value: every batch out of every epoch.
    std::fs::remove_file(&index).unwrap();
    let err = Loader::builder(&copy).build().map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("cubeload_index/t2m") && err.contains("is not stored"), "{err}");
}

#[test]
fn errors_name_the_variable_and_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.zarr");
    copy_dir(&cubes().pixel, &copy);
    // Corrupt every stored chunk (shard) of ndvi: replace it with garbage of the same length.
    let mut corrupted = 0;
    for entry in walk(&copy.join("ndvi/c")) {
        let len = std::fs::metadata(&entry).unwrap().len() as usize;
        std::fs::write(&entry, vec![0xA5u8; len]).unwrap();
        corrupted += 1;
    }
    assert!(corrupted > 0);
    let mut loader = Loader::builder(&copy).build().unwrap();
    let err = loader.next().unwrap().unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, LoaderError::Read { .. }), "{message}");
    assert!(message.contains("ndvi") && message.contains("chunk"), "{message}");
    assert!(loader.next().is_none(), "the stream ends after an error");

    let err = Loader::builder(&copy).variables(["t2m", "precip"]).build().unwrap_err().to_string();
    assert!(err.contains("precip") && err.contains("t2m, ndvi, landcover"), "{err}");
    let err = Loader::builder(dir.path().join("nothing.zarr")).build().unwrap_err().to_string();
    assert!(err.contains("nothing.zarr"), "{err}");
}

#[test]
fn a_flipped_byte_is_an_error_or_a_skipped_and_counted_batch() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.zarr");
    copy_dir(&cubes().pixel, &copy);
    // One flipped bit in the first stored chunk of one shard of ndvi: its checksum no longer matches.
    let mut files = walk(&copy.join("ndvi/c"));
    files.sort();
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&files[0], bytes).unwrap();
    let reference: HashMap<[usize; 3], _> =
        fingerprint(&collect(Loader::builder(&cubes().pixel).build().unwrap()))
            .into_iter()
            .map(|(_, _, chunk, sum)| (chunk, sum))
            .collect();

    let mut loader = Loader::builder(&copy).build().unwrap();
    let delivered = loader.by_ref().take_while(Result::is_ok).count();
    let bad = match Loader::builder(&copy).build().unwrap().nth(delivered) {
        Some(Err(LoaderError::Read { variable, chunk, message })) => {
            assert_eq!(variable, "ndvi");
            // The cube, the shard file and the chunk's bytes in it.
            let shard = files[0].strip_prefix(&copy).unwrap().to_string_lossy().into_owned();
            assert!(
                message.contains("copy.zarr") && message.contains(&format!("{shard} bytes ")),
                "{message}"
            );
            chunk
        }
        other => panic!("expected a read error after {delivered} batches, got {other:?}"),
    };
    assert!(loader.next().is_none(), "the stream ends after an error");
    let message = Loader::builder(&copy).build().unwrap().nth(delivered).unwrap().unwrap_err().to_string();
    assert!(message.contains("`ndvi`") && message.contains(&format!("{bad:?}")), "{message}");

    let mut loader = Loader::builder(&copy).on_corrupt(OnCorrupt::Skip).threads(3).build().unwrap();
    let batches: Vec<Batch> = loader.by_ref().map(Result::unwrap).collect();
    assert_eq!(loader.corrupt_chunks(), 1);
    assert_eq!(batches.len(), reference.len() - 1, "every other batch is delivered");
    for (_, _, chunk, sum) in fingerprint(&batches) {
        assert_ne!(chunk, bad);
        assert_eq!(reference[&chunk], sum, "chunk {chunk:?} as in the intact cube");
    }

    // Resuming across the gap (mixed jobs of 3 chunks, one of them corrupt) delivers exactly the rest.
    let skipping = || Loader::builder(&copy).on_corrupt(OnCorrupt::Skip).shuffle(3).mix(3).epochs(2);
    let full = fingerprint(&collect(skipping().build().unwrap()));
    // Where the skipped chunk's position is missing, in each epoch: stop just before, at and after it.
    let gaps: Vec<usize> = (1..full.len())
        .filter(|&i| full[i].0 == full[i - 1].0 && full[i].1 != full[i - 1].1 + 1)
        .chain((0..full.len()).filter(|&i| full[i].1 == 1 && (i == 0 || full[i - 1].0 != full[i].0)))
        .collect();
    assert_eq!(gaps.len(), 2, "one gap per epoch: {gaps:?}");
    let around = gaps.iter().flat_map(|&g| [g.saturating_sub(1), g, g + 1]);
    for stop_after in around.chain([1, full.len() / 2, full.len() - 1]) {
        let mut first = skipping().build().unwrap();
        let head: Vec<Batch> = first.by_ref().take(stop_after).map(Result::unwrap).collect();
        let rest = collect(
            Loader::builder(&copy)
                .on_corrupt(OnCorrupt::Skip)
                .epochs(2)
                .resume(first.state())
                .build()
                .unwrap(),
        );
        let mut joined = fingerprint(&head);
        joined.extend(fingerprint(&rest));
        assert_eq!(joined, full, "stopped after {stop_after}");
    }
}

/// The demo cube of 48 hours with a file per chunk (`shard: none`), in `dir`.
fn unsharded_cube(dir: &Path) -> PathBuf {
    let spec = cubeload::demo::DemoSpec {
        hours: 48,
        layout: "{ kind: pixel_series, batch: 64, shard: none }",
        ..Default::default()
    };
    cubeload::demo::build_cube(dir, &spec, None).unwrap().path
}

/// In an unsharded cube (a file per chunk, read with `pread` from the files the loader keeps open): a chunk
/// file that is missing is a missing chunk, as zarrs reads it, where the validity index says it holds no
/// valid value, and a lost file where it says it does; one cut short is an error naming the variable.
#[test]
fn an_unsharded_chunk_file_missing_is_missing_and_one_cut_short_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cube = unsharded_cube(dir.path());
    let mut files = walk(&cube.join("t2m/c"));
    files.sort();
    std::fs::remove_file(&files[0]).unwrap();
    let lost = Loader::builder(&cube).build().unwrap().find_map(Result::err).expect("an error");
    assert!(lost.to_string().contains("not stored, yet the cube's validity index says"), "{lost}");
    array(&cube, "cubeload_index/t2m").store_array_subset(&[0..1, 0..1, 0..1], &[0.0f32]).unwrap();
    let batches = collect(Loader::builder(&cube).build().unwrap());
    assert_cube_values(&cube, &batches);
    let t2m_missing = |b: &Batch| (0..b.len() * 48).all(|k| b.mask[k * 3] == 0);
    assert_eq!(batches.iter().filter(|b| t2m_missing(b)).count(), 1, "the batch of the missing file");

    let bytes = std::fs::read(&files[1]).unwrap();
    std::fs::write(&files[1], &bytes[..bytes.len() / 2]).unwrap();
    let error = Loader::builder(&cube).build().unwrap().find_map(Result::err).expect("an error");
    match error {
        LoaderError::Read { variable, message, .. } => {
            assert_eq!(variable, "t2m");
            assert!(message.contains(&*cube.to_string_lossy()), "{message}");
        }
        other => panic!("expected a read error, got {other:?}"),
    }
}

/// A shard file cut short (to a whole number of index entries): the chunks it held are a read error naming
/// the variable, not a panic or wrong values.
#[test]
fn a_shard_cut_short_is_a_read_error() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.zarr");
    copy_dir(&cubes().pixel, &copy);
    let mut files = walk(&copy.join("t2m/c"));
    files.sort();
    let bytes = std::fs::read(&files[0]).unwrap();
    std::fs::write(&files[0], &bytes[..160]).unwrap();
    let error = Loader::builder(&copy).build().unwrap().find_map(Result::err).expect("an error");
    match error {
        LoaderError::Read { variable, message, .. } => {
            assert_eq!(variable, "t2m");
            assert!(message.contains("copy.zarr"), "{message}");
        }
        other => panic!("expected a read error, got {other:?}"),
    }
}

type JsonEdit = fn(&mut serde_json::Value);

/// Edits the JSON file `path` in place.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_vec(&value).unwrap()).unwrap();
}

#[test]
fn metadata_that_would_allocate_absurdly_is_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, JsonEdit, &[&str]); 4] = [
        (
            "zarr.json",
            "root",
            |v| v["attributes"]["cubeload"]["layout"]["chunk_y"] = 0.into(),
            &["`layout.chunk_y` must be at least 1"],
        ),
        (
            "zarr.json",
            "root",
            |v| v["attributes"]["cubeload"]["padded_shape"][2] = (1u64 << 50).into(),
            &["`padded_shape`"],
        ),
        ("ndvi/zarr.json", "array", |v| v["shape"][2] = (1u64 << 50).into(), &["array `ndvi` has shape"]),
        (
            "ndvi/zarr.json",
            "array",
            |v| v["chunk_grid"]["configuration"]["chunk_shape"] = serde_json::json!([48, 1 << 20, 1 << 20]),
            &["array `ndvi` is chunked"],
        ),
    ];
    for (i, (file, what, edit, expected)) in cases.into_iter().enumerate() {
        let copy = dir.path().join(format!("copy{i}.zarr"));
        copy_dir(&cubes().pixel, &copy);
        edit_json(&copy.join(file), edit);
        let err = Loader::builder(&copy).build().unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, LoaderError::Cube(_)), "{what}: {message}");
        assert!(message.contains(&format!("copy{i}.zarr")), "{message}");
        for part in expected {
            assert!(message.contains(part), "{what}: expected `{part}` in {message}");
        }
    }
    // Through a slow store arrays are opened from the root's consolidated metadata: held to the same checks.
    let copy = dir.path().join("consolidated.zarr");
    copy_dir(&cubes().pixel, &copy);
    edit_json(&copy.join("zarr.json"), |v| {
        v["consolidated_metadata"]["metadata"]["ndvi"]["shape"][2] = (1u64 << 50).into();
    });
    let store = cubeload::store::Location::Local(copy.clone()).readable().unwrap();
    let slow = cubeload::store::LatencyStore::new(store, std::time::Duration::ZERO);
    let message = Loader::builder(&copy).store(slow.store()).build().unwrap_err().to_string();
    assert!(message.contains("array `ndvi` has shape"), "{message}");
    // The time coordinate (read by quicklook and append), chunked far past the axis: refused, not allocated.
    let copy = dir.path().join("time.zarr");
    copy_dir(&cubes().pixel, &copy);
    let huge: JsonEdit =
        |v| v["chunk_grid"]["configuration"]["chunk_shape"] = serde_json::json!([1u64 << 40]);
    edit_json(&copy.join("time/zarr.json"), huge);
    edit_json(&copy.join("zarr.json"), |v| huge(&mut v["consolidated_metadata"]["metadata"]["time"]));
    let message = cubeload::Cube::open(&copy).unwrap().times().unwrap_err().to_string();
    assert!(message.contains("its time coordinate is shaped [48] in chunks of 1099511627776"), "{message}");
}

/// Runs test `name` alone in a child process with the variable `env` set, and checks that it passed: for tests
/// that measure or change the whole process (its memory, its limit on open files). `false` in that child,
/// where the test itself runs.
fn ran_in_a_child_process(name: &str, env: &str) -> bool {
    if std::env::var_os(env).is_some() {
        return false;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &format!("loader::{name}"), "--nocapture", "--test-threads=1"])
        .env(env, "1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
    true
}

#[test]
fn memory_stays_flat_over_many_epochs() {
    // RSS is per process: measure in a child running only this test, away from the other tests' allocations.
    if ran_in_a_child_process("memory_stays_flat_over_many_epochs", "CUBELOAD_MEMORY_CHILD") {
        return;
    }
    let cube = &cubes().pixel;
    let rss = || -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        statm.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 4096
    };
    let mut loader = Loader::builder(cube).shuffle(2).epochs(40).threads(2).prefetch(4).build().unwrap();
    let per_epoch = loader.batches_per_epoch();
    let mut samples = HashMap::new();
    for (i, batch) in loader.by_ref().enumerate() {
        let batch = batch.unwrap();
        if i % per_epoch == 0 {
            samples.insert(i / per_epoch, rss());
        }
        drop(batch);
    }
    let early = samples[&5];
    let late = samples[&39];
    // Bounded by prefetch depth: no growth with epochs (a leak of one batch per step would add ~45 MB).
    eprintln!("RSS after epoch 5: {early} B, after epoch 39: {late} B");
    assert!(late < early + 8 * 1024 * 1024, "RSS grew from {early} to {late} bytes");
}

fn coordinate(cube: &Path, name: &str) -> Vec<f64> {
    let a = array(cube, name);
    let n = a.shape()[0];
    a.retrieve_array_subset::<Vec<f64>>(&[0..n]).unwrap()
}

#[test]
fn variable_major_batches_are_the_transposed_batches() {
    let cube = &cubes().pixel;
    let build =
        |vmajor| collect(Loader::builder(cube).shuffle(4).mix(3).variable_major(vmajor).build().unwrap());
    let (plain, vmajor) = (build(false), build(true));
    assert_eq!(plain.len(), vmajor.len());
    for (p, v) in plain.iter().zip(&vmajor) {
        let [b, t, n] = p.shape[..] else { panic!() };
        assert_eq!(v.shape, vec![n, b, t]);
        assert_eq!((v.len(), &v.lat), (b, &p.lat));
        for s in 0..b {
            for i in 0..t {
                for k in 0..n {
                    assert_eq!(p.data[(s * t + i) * n + k].to_bits(), v.data[(k * b + s) * t + i].to_bits());
                    assert_eq!(p.mask[(s * t + i) * n + k], v.mask[(k * b + s) * t + i]);
                }
            }
        }
    }
}

fn count_files(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 })
            .sum()
    })
}

#[test]
fn through_a_slow_store_the_batches_are_the_same_and_come_from_reads_fetched_ahead() {
    use cubeload::store::{LatencyStore, Location};
    let cube = &cubes().pixel;
    let local = collect(Loader::builder(cube).shuffle(9).build().unwrap());
    let slow = || {
        let store = Location::Local(cube.clone()).readable().unwrap();
        LatencyStore::new(store, std::time::Duration::from_millis(2))
    };
    let store = slow();
    let mut loader =
        Loader::builder(cube).store(store.store()).shuffle(9).threads(2).fetchers(8).build().unwrap();
    let mut remote = Vec::new();
    for batch in loader.by_ref() {
        remote.push(batch.unwrap());
    }
    assert_eq!(fingerprint(&remote), fingerprint(&local));
    // Every chunk of every batch (3 variables, each sharded) came from what the fetch threads had fetched;
    // the variables (float32 t2m and ndvi, uint8 landcover), all decoded by the loader, take their shards'
    // indexes from the fetch threads' cache. Only the cube's opening (root metadata, coordinates, validity
    // indexes) went to the store from the readers.
    let batches = remote.len() as u64;
    let (hits, misses) = loader.prefetched_reads().expect("a slow store gets fetch threads");
    assert_eq!(hits, 3 * batches, "a chunk per variable and batch ({misses} misses)");
    assert!(misses <= 8, "{misses} misses");
    // Requests: one per chunk of the time-varying variables, one per shard index (read once by the fetchers),
    // landcover's shards read whole once (its chunks given from them), and the opening.
    let shards: u64 = ["t2m", "ndvi", "landcover"].iter().map(|v| count_files(&cube.join(v).join("c"))).sum();
    let static_shards = count_files(&cube.join("landcover").join("c"));
    assert!(
        store.requests() <= 2 * batches + shards + static_shards + 12,
        "{} requests for {batches} batches",
        store.requests()
    );
    // Dropped mid-epoch, it stops its fetch threads too (a hang would time the test out).
    let mut partial = Loader::builder(cube).store(slow().store()).shuffle(9).fetchers(16).build().unwrap();
    assert!(partial.next().unwrap().is_ok());
    drop(partial);
    assert!(Loader::builder(cube).shuffle(9).build().unwrap().prefetched_reads().is_none(), "not locally");
}

/// Pages of the first `len` bytes of `file` (0: all of it) in the page cache (`mincore`).
#[cfg(target_os = "linux")]
fn resident_pages(file: &std::fs::File, len: usize) -> usize {
    use std::os::fd::AsRawFd;
    let len = if len == 0 { file.metadata().unwrap().len() as usize } else { len };
    let page = 4096;
    // SAFETY: a read-only shared mapping of an open file, unmapped before returning; `vec` holds a byte per
    // page.
    unsafe {
        let map =
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
        assert_ne!(map, libc::MAP_FAILED);
        let mut vec = vec![0u8; len.div_ceil(page)];
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
        libc::munmap(map, len);
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }
}

/// Reading ahead on a local cube: a reader's hint for a batch brings its chunk's stored bytes into the page
/// cache (the first chunk of the first shard of t2m, at the start of the shard file; the shard's index, read
/// to find the chunk, is at its end), after the file's pages were dropped.
#[cfg(target_os = "linux")]
#[test]
fn a_hint_brings_a_batch_into_the_page_cache() {
    use std::os::fd::AsRawFd;
    let path = &cubes().pixel;
    let shard = std::fs::File::open(path.join("t2m/c/0/0/0")).unwrap();
    shard.sync_all().unwrap();
    // SAFETY: a valid descriptor.
    unsafe { libc::posix_fadvise(shard.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if resident_pages(&shard, 0) > 0 {
        eprintln!("this file system keeps the shard's pages in memory: nothing to check");
        return;
    }
    let cube = cubeload::Cube::open(path).unwrap();
    let assembler = Assembler::new(&cube, &["t2m".to_string()], Transform::default()).unwrap();
    assembler.hint(&[[0, 0, 0]]);
    // The kernel reads asynchronously: wait for it, a few seconds at most.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while resident_pages(&shard, 4096) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(resident_pages(&shard, 4096), 1, "the hinted chunk's first page is in the page cache");
}

/// A cube stored without shards (its chunks decoded by the loader's own path, each from its own file) gives
/// batches that hold the cube's values, and the loader keeps at most an eighth of the process's limit on open
/// files open, closing one to open another: checked in a child process running only this test with a limit
/// of 512 (so 64 files), on a cube of more files than that.
#[cfg(target_os = "linux")]
#[test]
fn an_unsharded_cube_is_read_right_and_read_ahead_holds_few_files_open() {
    if ran_in_a_child_process(
        "an_unsharded_cube_is_read_right_and_read_ahead_holds_few_files_open",
        "CUBELOAD_FD_CHILD",
    ) {
        return;
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write only the struct given; this process runs this test alone.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit), 0);
        limit.rlim_cur = 512;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit), 0);
    }
    let bound = cubeload::loader::assemble::open_files_kept();
    assert_eq!(bound, 64, "an eighth of 512");
    let dir = tempfile::tempdir().unwrap();
    let cube_path = unsharded_cube(dir.path());
    assert_cube_values(&cube_path, &collect(Loader::builder(&cube_path).build().unwrap()));
    let cube_dir = cube_path.canonicalize().unwrap();
    let open_in_cube = || {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            // The cube's files; not its directory, which the cube holds open (its reads stay in it).
            .filter(|target| target.starts_with(&cube_dir) && *target != cube_dir)
            .count()
    };
    let files = walk(&cube_path.join("t2m")).len();
    assert!(files > 2 * bound, "{files} files of t2m");
    let cube = cubeload::Cube::open(&cube_path).unwrap();
    let assembler = Assembler::new(&cube, &[], Transform::default()).unwrap();
    let [ct, cy, cx] = cube.meta().chunk_counts();
    let mut most = 0;
    for t in 0..ct {
        for y in 0..cy {
            for x in 0..cx {
                assembler.hint(&[[t, y, x]]);
                most = most.max(open_in_cube());
            }
        }
    }
    assert_eq!(most, bound, "files open at most");
    assert_eq!(open_in_cube(), bound, "as many kept open at the end");
    drop(assembler);
    assert_eq!(open_in_cube(), 0, "closed with the assembler");
}

/// Cubes written with another codec chain (`gzip`, no compression) are decoded by zarrs, which does not
/// check a chunk's CRC32C when it reads part of a shard, nor tell a lost chunk from an all-missing one: the
/// loader checks both before it asks.
#[test]
fn chunks_zarrs_decodes_are_checked_too() {
    for codec in ["gzip", "none"] {
        let dir = tempfile::tempdir().unwrap();
        let text = cubeload::demo::write_inputs(
            dir.path(),
            &cubeload::demo::DemoSpec {
                hours: 48,
                layout: "{ kind: pixel_series, batch: 64 }",
                ..Default::default()
            },
        )
        .unwrap();
        let text = text.replace("codec: zstd, level: 3", &format!("codec: {codec}"));
        assert!(text.contains(&format!("codec: {codec}")), "{text}");
        let plan = Plan::new(Config::from_yaml(&text, Path::new("c.yaml")).unwrap(), text.clone()).unwrap();
        let cube = generate(&plan, &GenOptions::default(), &|_, _| {}).unwrap().path;
        let healthy = collect(Loader::builder(&cube).build().unwrap());
        assert_cube_values(&cube, &healthy);

        let mut files = walk(&cube.join("t2m/c"));
        files.sort();
        let mut bytes = std::fs::read(&files[0]).unwrap();
        bytes[40] ^= 0x10;
        std::fs::write(&files[0], bytes).unwrap();
        let error = Loader::builder(&cube).build().unwrap().find_map(Result::err).expect("an error");
        assert!(error.to_string().contains("CRC32C checksum mismatch"), "{codec}: {error}");

        std::fs::remove_file(&files[0]).unwrap();
        let error = Loader::builder(&cube).build().unwrap().find_map(Result::err).expect("an error");
        assert!(
            error.to_string().contains("not stored, yet the cube's validity index says"),
            "{codec}: {error}"
        );
    }
}
