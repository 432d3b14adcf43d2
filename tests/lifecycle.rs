//! A cube's life beyond one clean run: killed and resumed, checked, extended along time, made in parts.
//! Each ends compared with a cube made in one uninterrupted run from the same inputs: every stored byte
//! (chunks, coordinates, validity index) and the statistics must be the same.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cubeload::demo::{DemoSpec, IMAGE_LAYOUT, write_inputs};

use crate::util::{copy_dir, cubeload, meta, walk};

/// Writes the demo inputs into `dir` once; returns the config text over them.
fn inputs(dir: &Path) -> String {
    write_inputs(dir, &DemoSpec { layout: IMAGE_LAYOUT, ..DemoSpec::default() }).unwrap()
}

/// A config over the inputs of `text` writing `dir/NAME`, its time axis ending on `last_day` of June.
fn config(dir: &Path, text: &str, name: &str, last_day: u32) -> PathBuf {
    let text = text
        .replace(&format!("{}/demo.zarr", dir.display()), &format!("{}/{name}", dir.display()))
        .replace("end: 2024-06-07T23:00:00Z", &format!("end: 2024-06-{last_day:02}T23:00:00Z"));
    assert!(text.contains(&format!("end: 2024-06-{last_day:02}T23")), "{text}");
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn run_gen(dir: &Path, args: &[&str]) -> String {
    let out = cubeload(dir, &[&["gen"], args].concat());
    assert!(
        out.status.success(),
        "gen {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Every file of a cube but the root metadata and the manifest (which name the config and the time of
/// creation), by relative path.
/// `cubeload gen --append -c config`, refused as a usage error (exit 2) whose message says each of `says`.
fn append_refused(dir: &Path, config: &Path, says: &[&str]) {
    let out = cubeload(dir, &["gen", "--append", "-c", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(says.iter().all(|s| stderr.contains(s)), "{says:?}: {stderr}");
}

fn stored_files(cube: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                walk(root, &path, out);
            } else if rel != "zarr.json" && rel != "cubeload_manifest.jsonl" {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(cube, cube, &mut out);
    out
}

/// Asserts that two cubes hold the same bytes and statistics.
fn assert_same_cube(cube: &Path, reference: &Path) {
    let (a, b) = (stored_files(cube), stored_files(reference));
    assert!(a.len() > 10, "{} files only", a.len());
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "the same files");
    for (name, bytes) in &a {
        assert!(bytes == &b[name], "{name} differs from the uninterrupted run's");
    }
    let (ma, mb) = (meta(cube), meta(reference));
    for (va, vb) in ma["variables"].as_array().unwrap().iter().zip(mb["variables"].as_array().unwrap()) {
        assert_eq!(va["stats"], vb["stats"], "statistics of {}", va["name"]);
        assert_eq!(va["valid_fraction"], vb["valid_fraction"]);
    }
    assert_eq!(ma["shape"], mb["shape"]);
    assert_eq!(ma["complete"], true);
}

/// Finished blocks recorded in a manifest file (its lines but the header).
fn recorded_blocks(manifest: &Path) -> usize {
    std::fs::read_to_string(manifest).map_or(0, |t| t.lines().count().saturating_sub(1))
}

/// The first stored file (relative key) of variable `var` in a cube's or staging directory's manifest.
fn a_stored_file(dir: &Path, var: &str) -> String {
    let text = std::fs::read_to_string(dir.join("cubeload_manifest.jsonl")).unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["block"]["var"] == var)
        .flat_map(|r| r["files"].as_array().unwrap().clone())
        .find(|f| f["len"].as_u64().is_some_and(|n| n > 16))
        .map(|f| f["key"].as_str().unwrap().to_string())
        .expect("a stored file")
}

/// Runs `gen -c config` on one thread and SIGKILLs it once `manifest` records `at_least` blocks.
fn kill_gen_after(config: &Path, manifest: &Path, at_least: usize) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cubeload"))
        .args(["gen", "--threads", "1", "-c", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while recorded_blocks(manifest) < at_least {
        assert!(child.try_wait().unwrap().is_none(), "gen finished before it could be killed");
        assert!(started.elapsed() < Duration::from_mins(2), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = at.min(bytes.len() - 1);
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_killed_gen_resumes_and_ends_with_the_cube_of_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let text = inputs(dir);
    let reference_config = config(dir, &text, "reference.zarr", 7);
    run_gen(dir, &["-c", reference_config.to_str().unwrap()]);
    let config = config(dir, &text, "cube.zarr", 7);
    let staging = dir.join(".cube.zarr.cubeload-partial");
    let manifest = staging.join("cubeload_manifest.jsonl");

    // SIGKILL twice, at different points, each time while blocks are being written.
    for at_least in [3, 12] {
        kill_gen_after(&config, &manifest, at_least);
    }
    assert!(!dir.join("cube.zarr").exists(), "an interrupted run never leaves a cube in place");
    let info = cubeload(dir, &["info", "cube.zarr"]);
    assert_eq!(info.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&info.stderr);
    assert!(stderr.contains("interrupted") && stderr.contains("resume"), "{stderr}");
    // The half-made cube itself is refused as incomplete, with the way out.
    let loader = cubeload::Loader::builder(&staging).build().unwrap_err().to_string();
    assert!(loader.contains("incomplete cube") && loader.contains("resume"), "{loader}");

    // verify of the half-made cube, before any damage: incomplete, nothing else (files of the blocks the
    // kills cut short are not damage), and the way out.
    let out = cubeload(dir, &["verify", staging.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().collect::<Vec<_>>(), ["incomplete cube: its completion marker is missing"]);
    assert!(stderr.contains("1 problem found: its generation did not finish"), "{stderr}");

    // Damage a finished chunk, as a power loss could: the resumed run must notice and redo its block.
    let damaged = a_stored_file(&staging, "t2m");
    flip_byte(&staging.join(&damaged), 20);
    let blocks_before = recorded_blocks(&manifest);
    // verify of the half-made cube: incomplete, and that chunk damaged; the files not written yet are no
    // problem.
    let out = cubeload(dir, &["verify", staging.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("incomplete cube") && stdout.contains(&damaged), "{stdout}");
    assert!(!stdout.contains("not in the manifest"), "{stdout}");

    let stdout = run_gen(dir, &["-c", config.to_str().unwrap()]);
    let kept: usize = stdout
        .lines()
        .find_map(|l| l.strip_suffix(" of the blocks were kept from an interrupted run or the previous cube"))
        .unwrap_or_else(|| panic!("no resume line in:\n{stdout}"))
        .trim()
        .parse()
        .unwrap();
    // Every recorded block but the damaged one (and a line the kill may have cut short).
    assert!(
        kept >= 10 && kept < blocks_before && kept + 2 >= blocks_before,
        "kept {kept} of {blocks_before}"
    );
    assert!(!staging.exists());
    assert_same_cube(&dir.join("cube.zarr"), &dir.join("reference.zarr"));
    let verify = cubeload(dir, &["verify", "cube.zarr"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
}

#[test]
fn a_half_made_cube_is_not_continued_with_another_config_or_other_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let text = inputs(dir);
    let config = config(dir, &text, "cube.zarr", 7);
    let manifest = dir.join(".cube.zarr.cubeload-partial/cubeload_manifest.jsonl");
    kill_gen_after(&config, &manifest, 2);
    let before = std::fs::read(&manifest).unwrap();

    // Another input file: refused, the half-made cube untouched.
    let ndvi = dir.join("inputs/ndvi/ndvi_2024-06-03.tif");
    let original = std::fs::read(&ndvi).unwrap();
    std::fs::copy(dir.join("inputs/ndvi/ndvi_2024-06-05.tif"), &ndvi).unwrap();
    let out = cubeload(dir, &["gen", "-c", config.to_str().unwrap()]);
    // The output is taken by something gen will not replace without --overwrite: a usage error.
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Named: the file, its variable and what became of it.
    let named = format!("other input files (`ndvi`: {} changed)", ndvi.display());
    assert!(stderr.contains(&named) && stderr.contains("--overwrite"), "{stderr}");
    assert_eq!(std::fs::read(&manifest).unwrap(), before, "nothing of the half-made cube changed");
    std::fs::write(&ndvi, original).unwrap();

    // Another config: refused too; with --overwrite it starts over and completes.
    let text = std::fs::read_to_string(&config).unwrap().replace("level: 3", "level: 5");
    std::fs::write(&config, text).unwrap();
    let out = cubeload(dir, &["gen", "-c", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("from a different configuration is kept"), "{stderr}");
    assert_eq!(std::fs::read(&manifest).unwrap(), before);
    let stdout = run_gen(dir, &["--overwrite", "-c", config.to_str().unwrap()]);
    assert!(!stdout.contains("kept"), "{stdout}");
    assert_eq!(meta(&dir.join("cube.zarr"))["compression"], "zstd(5)");
}

/// `dir/cube.zarr` generated from three days of the inputs, for `verify` to check.
fn three_day_cube(dir: &Path) {
    let text = inputs(dir);
    let config = config(dir, &text, "cube.zarr", 3);
    run_gen(dir, &["-c", config.to_str().unwrap()]);
}

/// The inner chunk of the shard file at `key` (its index at the end: offset and length of each chunk, then
/// the index's CRC32C) whose bytes hold byte `at`, as the loader names it (`[time, lat, lon]`): the index
/// read by hand, as a reference for what `verify` names.
fn chunk_holding(cube: &Path, key: &str, at: u64) -> String {
    let bytes = std::fs::read(cube.join(key)).unwrap();
    let array = key.split("/c/").next().unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cube.join(array).join("zarr.json")).unwrap()).unwrap();
    let sharding = &meta["codecs"][0]["configuration"];
    assert_eq!(meta["codecs"][0]["name"], "sharding_indexed", "{meta}");
    assert_eq!(sharding["index_location"].as_str().unwrap_or("end"), "end");
    let inner: Vec<u64> =
        sharding["chunk_shape"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
    let outer: Vec<u64> = meta["chunk_grid"]["configuration"]["chunk_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    let per_shard = outer.last().unwrap() / inner.last().unwrap();
    let index = &bytes[bytes.len() - 16 * per_shard as usize - 4..bytes.len() - 4];
    let word = |i: usize| u64::from_le_bytes(index[8 * i..8 * i + 8].try_into().unwrap());
    let k = (0..per_shard as usize)
        .find(|&k| (word(2 * k)..word(2 * k) + word(2 * k + 1)).contains(&at))
        .expect("a chunk holds the byte");
    let mut id: Vec<u64> = key.rsplit("/c/").next().unwrap().split('/').map(|i| i.parse().unwrap()).collect();
    *id.last_mut().unwrap() = id.last().unwrap() * per_shard + k as u64;
    if id.len() == 2 {
        id.insert(0, 0); // a static variable's chunks are named at time chunk 0
    }
    format!("{id:?}")
}

#[test]
fn verify_names_the_variable_and_chunk_of_each_damaged_file() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    three_day_cube(dir);
    let cube = dir.join("cube.zarr");
    let ok = cubeload(dir, &["verify", "cube.zarr"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    assert!(String::from_utf8_lossy(&ok.stdout).contains(": OK ("));

    // The cube is sharded: each file holds several chunks, and the damaged one is named, not the shard.
    let flipped = a_stored_file(&cube, "t2m");
    flip_byte(&cube.join(&flipped), 100);
    let damaged = chunk_holding(&cube, &flipped, 100);
    let truncated = a_stored_file(&cube, "ndvi");
    let bytes = std::fs::read(cube.join(&truncated)).unwrap();
    std::fs::write(cube.join(&truncated), &bytes[..bytes.len() / 2]).unwrap();
    let removed = a_stored_file(&cube, "landcover");
    std::fs::remove_file(cube.join(&removed)).unwrap();

    let out = cubeload(dir, &["verify", "cube.zarr"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines = |var: &str| -> Vec<&str> {
        stdout.lines().filter(|l| l.starts_with(&format!("variable `{var}`"))).collect()
    };
    // Each damaged file once, naming it, the chunks it holds and what is wrong with it.
    for (var, key, why) in [
        ("t2m", &flipped, "checksum mismatch"),
        ("ndvi", &truncated, "truncated"),
        ("landcover", &removed, "missing"),
    ] {
        let file: Vec<&str> =
            lines(var).into_iter().filter(|l| l.contains(&format!("file {key} (holding chunks"))).collect();
        assert!(file.len() == 1 && file[0].contains(why), "{var}: {stdout}");
    }
    // The flipped byte's chunk, by its index, and no other chunk of that shard.
    let chunks: Vec<&str> = lines("t2m").into_iter().filter(|l| l.contains(", chunk [")).collect();
    assert_eq!(chunks.len(), 1, "{stdout}");
    assert!(chunks[0].starts_with(&format!("variable `t2m`, chunk {damaged}: ")), "{stdout}");
    assert!(chunks[0].contains("checksum mismatch") && chunks[0].contains(&flipped), "{stdout}");
    // The cut file's chunks cannot be read; the lost file is one problem, not one per chunk.
    assert!(lines("ndvi").len() >= 2, "{stdout}");
    assert_eq!(lines("landcover").len(), 1, "{stdout}");
    let problems = stdout.lines().count();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("{problems} problems found")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same flipped bit is caught by the chunk's own checksum, with no manifest at all.
    std::fs::remove_file(cube.join("cubeload_manifest.jsonl")).unwrap();
    let out = cubeload(dir, &["verify", "cube.zarr"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let decoded = stdout.lines().find(|l| l.contains(&flipped)).unwrap_or_else(|| panic!("{stdout}"));
    assert!(decoded.starts_with(&format!("variable `t2m`, chunk {damaged}: ")), "{stdout}");
    assert!(decoded.contains("checksum mismatch"), "{stdout}");
}

#[test]
fn verify_finds_changed_metadata_coordinates_and_index_and_a_damaged_manifest_line() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    three_day_cube(dir);
    let cube = dir.join("cube.zarr");

    // None of these is a block's chunk: a missing index chunk would leave the loader no batch, a missing
    // coordinate reads as NaN, and edited statistics would normalize with the wrong values.
    let index = "cubeload_index/t2m/c/0/0/0";
    std::fs::remove_file(cube.join(index)).unwrap();
    flip_byte(&cube.join("lat/c/0"), 20);
    let root = std::fs::read_to_string(cube.join("zarr.json")).unwrap();
    let edited = root.replacen("\"valid_fraction\"", "\"valid_fraction\": 0.0, \"was\"", 1);
    assert_ne!(root, edited);
    std::fs::write(cube.join("zarr.json"), edited).unwrap();
    // A manifest line garbled in the middle of the file (not the torn end of an interrupted run).
    let manifest = cube.join("cubeload_manifest.jsonl");
    let mut lines: Vec<String> =
        std::fs::read_to_string(&manifest).unwrap().lines().map(str::to_string).collect();
    lines[2] = lines[2].replacen("\"key\"", "\"kex\"", 1);
    std::fs::write(&manifest, lines.join("\n") + "\n").unwrap();

    let out = cubeload(dir, &["verify", "cube.zarr"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line =
        |text: &str| stdout.lines().find(|l| l.contains(text)).unwrap_or_else(|| panic!("{text}: {stdout}"));
    assert!(line(index).starts_with("variable `cubeload_index/t2m`") && line(index).contains("missing"));
    assert!(line("lat/c/0").starts_with("variable `lat`") && line("lat/c/0").contains("checksum mismatch"));
    // Each once: the seal names them, and the reads of coordinates and index do not again.
    for file in [index, "lat/c/0"] {
        assert_eq!(stdout.lines().filter(|l| l.contains(file)).count(), 1, "{stdout}");
    }
    assert!(line("file zarr.json").contains("bytes instead of"), "{stdout}");
    assert!(line("the manifest is damaged").contains("cubeload_manifest.jsonl line 3"), "{stdout}");
    assert!(line(": not in the manifest").starts_with("variable `t2m`"), "{stdout}");
}

#[test]
fn verify_finds_a_manifest_whose_seal_was_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    three_day_cube(dir);
    let manifest = dir.join("cube.zarr/cubeload_manifest.jsonl");
    let text = std::fs::read_to_string(&manifest).unwrap();
    // Its last line cut short, as a crash cuts the line being appended (which a resumed run ignores).
    std::fs::write(&manifest, &text[..text.len() - 200]).unwrap();
    let out = cubeload(dir, &["verify", "cube.zarr"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("seal of the metadata, coordinates and validity index, is missing"), "{stdout}");
}

#[test]
fn verify_finds_lost_coordinates_and_index_of_a_cube_without_a_seal() {
    // A cube of an earlier version has no seal: its coordinates and validity index are checked by reading
    // them, and a chunk file zarrs does not find reads as fill values (all NaT and NaN to xarray).
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    three_day_cube(dir);
    let cube = dir.join("cube.zarr");
    let manifest = cube.join("cubeload_manifest.jsonl");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.last().unwrap().contains("seal"), "{}", lines.last().unwrap());
    std::fs::write(&manifest, format!("{}\n", lines[..lines.len() - 1].join("\n"))).unwrap();
    let root = cube.join("zarr.json");
    let mut meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&root).unwrap()).unwrap();
    meta["attributes"]["cubeload"].as_object_mut().unwrap().remove("sealed");
    std::fs::write(&root, serde_json::to_string(&meta).unwrap()).unwrap();
    let out = cubeload(dir, &["verify", "cube.zarr"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    let index = walk(&cube.join("cubeload_index/t2m"))
        .into_iter()
        .find(|p| p.to_string_lossy().contains("/c/"))
        .unwrap();
    for lost in [cube.join("time/c/0"), cube.join("lat/c/0"), index] {
        std::fs::remove_file(lost).unwrap();
    }
    let out = cubeload(dir, &["verify", "cube.zarr"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line =
        |text: &str| stdout.lines().find(|l| l.contains(text)).unwrap_or_else(|| panic!("{text}: {stdout}"));
    assert!(
        line("time/c/0").starts_with("variable `time`") && line("time/c/0").contains("missing"),
        "{stdout}"
    );
    assert!(line("lat/c/0").starts_with("variable `lat`"), "{stdout}");
    assert!(line("cubeload_index/t2m/c/").contains("missing"), "{stdout}");
}

#[test]
fn append_extends_along_time_and_equals_a_cube_made_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let text = inputs(dir);
    let reference = config(dir, &text, "reference.zarr", 7);
    run_gen(dir, &["-c", reference.to_str().unwrap()]);
    let four_days = config(dir, &text, "cube.zarr", 4);
    run_gen(dir, &["-c", four_days.to_str().unwrap()]);
    let before = stored_files(&dir.join("cube.zarr"));

    // Next days' inputs arrive: the same config with a later end.
    let seven_days = config(dir, &text, "cube.zarr", 7);
    // A failed append (one new file unreadable) leaves the previous cube as it was, readable.
    let late = dir.join("inputs/ndvi/ndvi_2024-06-07.tif");
    let good = std::fs::read(&late).unwrap();
    std::fs::write(&late, &good[..good.len() / 3]).unwrap();
    let out = cubeload(dir, &["gen", "--append", "-c", seven_days.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ndvi_2024-06-07.tif"));
    assert_eq!(stored_files(&dir.join("cube.zarr")), before, "the previous cube is intact");
    assert_eq!(meta(&dir.join("cube.zarr"))["time"]["end"], "2024-06-04T23:00:00Z");
    std::fs::write(&late, good).unwrap();
    // The failed run's half-made cube was made from the damaged file: continuing it is refused ...
    append_refused(dir, &seven_days, &["other input files (`ndvi`: ", "ndvi_2024-06-07.tif changed)"]);
    assert_eq!(stored_files(&dir.join("cube.zarr")), before);

    // ... and discarded with --overwrite, which with --append never touches the previous cube itself.
    let stdout = run_gen(dir, &["--append", "--overwrite", "-c", seven_days.to_str().unwrap()]);
    assert!(stdout.contains("were kept"), "unchanged blocks are reused: {stdout}");
    assert_same_cube(&dir.join("cube.zarr"), &dir.join("reference.zarr"));
    assert_eq!(meta(&dir.join("cube.zarr"))["time"]["end"], "2024-06-07T23:00:00Z");

    // Nothing new: refused as a config error, the cube untouched.
    append_refused(dir, &seven_days, &["nothing to append"]);
    // A changed step or start: refused as such, not as an axis that adds nothing.
    let original = std::fs::read_to_string(&seven_days).unwrap();
    for (from, to, says) in [
        ("step: 1h", "step: 2h", "its step is 2h, the cube's 1h"),
        ("start: 2024-06-01T00", "start: 2024-06-02T00", "it starts at 2024-06-02T00:00:00Z"),
    ] {
        std::fs::write(&seven_days, original.replace(from, to).replace("06-07T23", "06-09T23")).unwrap();
        append_refused(dir, &seven_days, &["does not continue the cube's", says]);
    }
    std::fs::write(&seven_days, original).unwrap();
    // A changed encoding: refused.
    let text = std::fs::read_to_string(&seven_days).unwrap().replace("level: 3", "level: 9");
    std::fs::write(&seven_days, text.replace("06-07T23", "06-08T23")).unwrap();
    append_refused(dir, &seven_days, &["compression (zstd(9)) differs from the cube's (zstd(3))"]);
    // A changed grid: refused, both grids said as `info` says them.
    let text = std::fs::read_to_string(&seven_days).unwrap().replace("level: 9", "level: 3");
    std::fs::write(&seven_days, text.replace("resolution: 0.01", "resolution: 0.02")).unwrap();
    append_refused(
        dir,
        &seven_days,
        &["grid (75 × 50 cells of 0.02° × 0.02°, bbox [9.5, 45, 11, 46]) differs from the cube's (150 × 100"],
    );
    // A changed sequence length: refused, a batch would hold sequences of another length.
    let text = std::fs::read_to_string(&seven_days).unwrap().replace("resolution: 0.02", "resolution: 0.01");
    std::fs::write(&seven_days, text.replace("seq_len: 8", "seq_len: 4")).unwrap();
    append_refused(dir, &seven_days, &["layout.seq_len (4) differs from the cube's (8)"]);
}

/// `--append` onto no cube is a usage error that says so (it said a run was generating the cube: its own
/// run), and an append whose batches would hold series of another length (`window`) is refused.
#[test]
fn append_needs_a_cube_and_keeps_the_length_of_its_series() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    inputs(dir);
    let series = dir.join("series");
    std::fs::create_dir(&series).unwrap();
    let date = |day: &str| {
        let name = format!("ndvi_2024-06-{day}.tif");
        std::fs::copy(dir.join("inputs/ndvi/ndvi_2024-06-01.tif"), series.join(name)).unwrap();
    };
    let config = dir.join("series.yaml");
    let with_window = |window: &str| {
        let text = format!(
            "output: {}/cube.zarr\ngrid: {{ bbox: [9.5, 45.0, 11.0, 46.0], resolution: 0.01 }}\n\
             time: {{ from: ndvi }}\nlayout: {{ kind: pixel_series, batch: 256{window} }}\nvariables:\n  \
             ndvi: {{ path: \"{}/ndvi_*.tif\" }}\n",
            dir.display(),
            series.display()
        );
        std::fs::write(&config, text).unwrap();
    };
    let refused = |says: &str| append_refused(dir, &config, &[says]);
    for day in ["01", "02", "03"] {
        date(day);
    }
    with_window(", window: 2");
    refused("cannot append: there is no cube here to extend; run without --append to make it");
    let left: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!left.iter().any(|name| name.to_string_lossy().contains("cube.zarr")), "left behind: {left:?}");

    run_gen(dir, &["-c", config.to_str().unwrap()]);
    date("04");
    with_window(", window: 1");
    refused("layout.window (1) differs from the cube's (2)");
    with_window("");
    refused("layout.window (none: whole series) differs from the cube's (2)");
    with_window(", window: 2");
    run_gen(dir, &["--append", "-c", config.to_str().unwrap()]);
    assert_eq!(meta(&dir.join("cube.zarr"))["time"]["steps"], 4);

    // Made without a window, its chunks hold the whole series: a window is another length, even one as long
    // as the series (the cube's window is read from the config it was made from).
    with_window("");
    run_gen(dir, &["--overwrite", "-c", config.to_str().unwrap()]);
    date("05");
    for window in [3, 4] {
        with_window(&format!(", window: {window}"));
        refused(&format!("layout.window ({window}) differs from the cube's (none: whole series)"));
    }
    with_window("");
    run_gen(dir, &["--append", "-c", config.to_str().unwrap()]);
    assert_eq!(meta(&dir.join("cube.zarr"))["time"]["steps"], 5);
    assert_eq!(meta(&dir.join("cube.zarr"))["layout"]["chunk_t"], 5);
}

/// An axis of the dates of a file series is irregular, or of one step: a cube on one grows by later dates
/// whatever their spacing, as a cube on a regular axis grows by an irregular one that continues it.
#[test]
fn append_continues_a_series_axis_whatever_the_spacing_of_its_dates() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    inputs(dir);
    let series = dir.join("series");
    std::fs::create_dir(&series).unwrap();
    let text = format!(
        "output: {}/cube.zarr\ngrid: {{ bbox: [9.5, 45.0, 11.0, 46.0], resolution: 0.01 }}\ntime: {{ from: ndvi }}\n\
         layout: {{ kind: pixel_series, batch: 256 }}\nvariables:\n  ndvi: {{ path: \"{}/ndvi_*.tif\" }}\n",
        dir.display(),
        series.display()
    );
    let config = dir.join("series.yaml");
    std::fs::write(&config, text).unwrap();
    let config = config.to_str().unwrap();
    let date = |day: &str| {
        let name = format!("ndvi_2024-06-{day}.tif");
        std::fs::copy(dir.join("inputs/ndvi").join(&name), series.join(&name)).unwrap();
    };
    // One date (an irregular axis), then a second (the axis regular, step 2d), then one 4 days later.
    date("01");
    run_gen(dir, &["-c", config]);
    for (day, steps) in [("03", 2), ("07", 3)] {
        date(day);
        run_gen(dir, &["--append", "-c", config]);
        assert_eq!(meta(&dir.join("cube.zarr"))["time"]["steps"], steps);
    }
    assert_eq!(meta(&dir.join("cube.zarr"))["time"]["end"], "2024-06-07T00:00:00Z");
    // A date arriving between the cube's changes its steps: not an extension.
    date("05");
    append_refused(
        dir,
        Path::new(config),
        &["its step 2 is 2024-06-05T00:00:00Z, the cube's 2024-06-07T00:00:00Z"],
    );
    std::fs::remove_file(series.join("ndvi_2024-06-05.tif")).unwrap();

    // Month starts: two are 31 days apart, three are monthly; the third continues the first two.
    for name in ["ndvi_2024-06-01.tif", "ndvi_2024-06-03.tif", "ndvi_2024-06-07.tif"] {
        std::fs::remove_file(series.join(name)).unwrap();
    }
    let month = |m: u32| {
        let from = dir.join("inputs/ndvi/ndvi_2024-06-01.tif");
        std::fs::copy(from, series.join(format!("ndvi_2024-{m:02}-01.tif"))).unwrap();
    };
    month(1);
    month(2);
    run_gen(dir, &["--overwrite", "-c", config]);
    month(3);
    run_gen(dir, &["--append", "-c", config]);
    assert_eq!(meta(&dir.join("cube.zarr"))["time"]["steps"], 3);
    assert_eq!(meta(&dir.join("cube.zarr"))["time"]["step"], "1mo");
}

/// A run stopped between the two renames of its swap (the previous cube moved aside, the new one not yet in
/// place) loses nothing: the next run puts the previous cube back, then finishes as it would have.
#[test]
fn a_swap_stopped_halfway_is_finished_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let text = inputs(dir);
    let reference = config(dir, &text, "reference.zarr", 5);
    run_gen(dir, &["-c", reference.to_str().unwrap()]);
    let four_days = config(dir, &text, "cube.zarr", 4);
    run_gen(dir, &["-c", four_days.to_str().unwrap()]);
    let five_days = config(dir, &text, "cube.zarr", 5);
    let old = dir.join(".cube.zarr.cubeload-old");
    std::fs::rename(dir.join("cube.zarr"), &old).unwrap();
    // Readers meanwhile are told where the previous cube is, and that the next run puts it back.
    let out = cubeload(dir, &["info", "cube.zarr"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(".cube.zarr.cubeload-old") && stderr.contains("puts it back"), "{stderr}");
    run_gen(dir, &["--append", "-c", five_days.to_str().unwrap()]);
    assert_same_cube(&dir.join("cube.zarr"), &dir.join("reference.zarr"));
    assert!(!old.exists(), "the previous cube, superseded, is removed");
}

/// A run stopped after the new cube took its place, before or while deleting the previous one, leaves that
/// one beside it: whole (not yet renamed aside), which the next run deletes, or partly deleted (its root
/// still says complete) under another name, which is never put back, even once the new cube is gone (a
/// partly deleted cube had come back at the output path).
#[test]
fn a_swap_stopped_after_the_new_cube_is_in_place_never_brings_the_previous_one_back() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let text = inputs(dir);
    let four_days = config(dir, &text, "cube.zarr", 4);
    run_gen(dir, &["-c", four_days.to_str().unwrap()]);
    let cube = dir.join("cube.zarr");
    let (old, superseded) = (dir.join(".cube.zarr.cubeload-old"), dir.join(".cube.zarr.cubeload-superseded"));
    let copy = |to: &Path| copy_dir(&cube, to);
    // Stopped before its last rename: the previous cube whole beside the new one; a later run deletes it.
    copy(&old);
    let five_days = config(dir, &text, "cube.zarr", 5);
    run_gen(dir, &["--append", "-c", five_days.to_str().unwrap()]);
    assert!(!old.exists());
    // Stopped while deleting it: part of it left, its root intact. The user then deletes the new cube and
    // generates anew: the run makes a new cube, it does not bring the damaged one back.
    copy(&superseded);
    std::fs::remove_dir_all(superseded.join("t2m")).unwrap();
    std::fs::remove_dir_all(&cube).unwrap();
    run_gen(dir, &["-c", five_days.to_str().unwrap()]);
    assert!(!superseded.exists());
    assert_eq!(meta(&cube)["time"]["end"], "2024-06-05T23:00:00Z");
    let verify = cubeload(dir, &["verify", "cube.zarr"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    // A directory of the user's at the output path beside a previous cube: neither is touched.
    copy(&old);
    std::fs::remove_dir_all(&cube).unwrap();
    std::fs::create_dir(&cube).unwrap();
    std::fs::write(cube.join("notes.txt"), "mine").unwrap();
    let out = cubeload(dir, &["gen", "--overwrite", "-c", five_days.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(old.join("zarr.json").exists() && cube.join("notes.txt").exists());
}

#[test]
fn parts_run_concurrently_and_finalize_into_the_cube_of_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let text = inputs(dir);
    let reference = config(dir, &text, "reference.zarr", 5);
    run_gen(dir, &["-c", reference.to_str().unwrap()]);
    let config = config(dir, &text, "cube.zarr", 5);
    let config = config.to_str().unwrap();
    // Nothing to finalize before any part has run: a usage error that says to run the parts.
    let none = cubeload(dir, &["gen", "--finalize", "-c", config]);
    let stderr = String::from_utf8_lossy(&none.stderr);
    assert_eq!(none.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no part of this cube has run") && stderr.contains("--part K/N"), "{stderr}");

    // Parts 0 and 2 of 3 at the same time, as two tasks of a job array would.
    let children: Vec<_> = ["0/3", "2/3"]
        .iter()
        .map(|part| {
            Command::new(env!("CARGO_BIN_EXE_cubeload"))
                .args(["gen", "--threads", "1", "--part", part, "-c", config])
                .output_async()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("--finalize"));
    }
    assert!(!dir.join("cube.zarr").exists());
    // `info` says what comes next: the parts, then --finalize (not a whole run, which must not run beside
    // parts).
    let info = cubeload(dir, &["info", "cube.zarr"]);
    assert_eq!(info.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&info.stderr);
    assert!(stderr.contains("parts of its generation") && stderr.contains("--finalize"), "{stderr}");
    let early = cubeload(dir, &["gen", "--finalize", "-c", config]);
    assert_eq!(early.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&early.stderr);
    assert!(stderr.contains("cannot finalize") && stderr.contains("blocks are not written"), "{stderr}");
    assert!(!dir.join("cube.zarr").exists());

    run_gen(dir, &["--part", "1/3", "-c", config]);
    let finalized = run_gen(dir, &["--finalize", "-c", config]);
    // Its blocks are the parts', not kept from an interrupted run.
    assert!(
        finalized.contains("written by the --part runs") && !finalized.contains("interrupted"),
        "{finalized}"
    );
    assert_same_cube(&dir.join("cube.zarr"), &dir.join("reference.zarr"));
    let verify = cubeload(dir, &["verify", "cube.zarr"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    // Finalized twice: there is nothing left to finalize, not a cube to --overwrite or --append.
    let again = cubeload(dir, &["gen", "--finalize", "-c", config]);
    assert_eq!(again.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("a finished cube is here already"), "{stderr}");

    let bad = cubeload(dir, &["gen", "--part", "3/3", "-c", config]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("counts from 0"));
}

/// Parts started together with two configs each find no other part's manifest at their start: the part
/// manifest of the other config is then found once each has written its own, and `--finalize` names it.
#[test]
fn parts_of_another_config_are_named_not_taken_for_unwritten_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let text = inputs(dir);
    let config = config(dir, &text, "cube.zarr", 2);
    let config = config.to_str().unwrap();
    run_gen(dir, &["--part", "0/2", "-c", config]);
    // Part 1 of another config, written beside part 0 as a concurrent run would have (its header's
    // fingerprint differs).
    let staging = dir.join(".cube.zarr.cubeload-partial");
    let mine = std::fs::read_to_string(staging.join("cubeload_manifest.part-00000-of-00002.jsonl")).unwrap();
    let header: serde_json::Value = serde_json::from_str(mine.lines().next().unwrap()).unwrap();
    let fingerprint = header["fingerprint"].as_str().unwrap();
    let other =
        format!("{}\n", mine.lines().next().unwrap().replace(fingerprint, &"0".repeat(fingerprint.len())));
    std::fs::write(staging.join("cubeload_manifest.part-00001-of-00002.jsonl"), other).unwrap();

    let finalize = cubeload(dir, &["gen", "--finalize", "-c", config]);
    assert_eq!(finalize.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&finalize.stderr);
    assert!(
        stderr.contains(
            "cubeload_manifest.part-00001-of-00002.jsonl record parts run with another configuration"
        ),
        "{stderr}"
    );
    let again = cubeload(dir, &["gen", "--part", "0/2", "-c", config]);
    assert_eq!(again.status.code(), Some(2), "parts of two configs: a usage error");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("parts of this cube run with different configurations"), "{stderr}");
    // Run with this config, the other part replaces that manifest, and the cube completes.
    run_gen(dir, &["--part", "1/2", "-c", config]);
    run_gen(dir, &["--finalize", "-c", config]);
    assert!(cubeload(dir, &["verify", "cube.zarr"]).status.success());
}

/// Parts of two configs started together: the one refused had written a header and left it, so the staging
/// directory counted as its own. Its `--finalize`, finding no block of its own, then deleted the directory
/// with the blocks the other config's parts had written. A failed `--finalize` keeps every part's blocks;
/// a part refused for a half-made cube of another config is told to delete it (`--overwrite` does not go
/// with `--part`, and it was told to add it).
#[test]
fn a_failed_finalize_keeps_the_blocks_of_parts_of_another_config() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let text = inputs(dir);
    let ours = config(dir, &text, "cube.zarr", 2);
    let theirs = dir.join("theirs.yaml");
    let other = std::fs::read_to_string(&ours).unwrap().replace("level: 3", "level: 5");
    assert_ne!(other, std::fs::read_to_string(&ours).unwrap());
    std::fs::write(&theirs, other).unwrap();
    let (ours, theirs) = (ours.to_str().unwrap(), theirs.to_str().unwrap());
    // The header of a part of ours, alone, as a part refused in the race left it beside the other config's.
    let staging = dir.join(".cube.zarr.cubeload-partial");
    run_gen(dir, &["--part", "0/2", "-c", ours]);
    let manifest = staging.join("cubeload_manifest.part-00000-of-00002.jsonl");
    let header = std::fs::read_to_string(&manifest).unwrap().lines().next().unwrap().to_string();
    std::fs::remove_dir_all(&staging).unwrap();
    run_gen(dir, &["--part", "1/2", "-c", theirs]);
    std::fs::write(&manifest, format!("{header}\n")).unwrap();
    let written = stored_files(&staging);
    assert!(written.keys().any(|k| k.contains("/c/")), "the other config's parts wrote blocks");

    let finalize = cubeload(dir, &["gen", "--finalize", "-c", ours]);
    assert_eq!(finalize.status.code(), Some(1), "{}", String::from_utf8_lossy(&finalize.stderr));
    // The blocks' chunk files (the metadata is made anew by each run).
    let chunks = |files: BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
        files.into_iter().filter(|(k, _)| k.contains("/c/")).collect()
    };
    let left = chunks(stored_files(&staging));
    assert!(left == chunks(written), "a failed --finalize deleted the parts' blocks: {:?}", left.keys());
    // The other config is in the way of this one's parts, and deleting it is the way out.
    let part = cubeload(dir, &["gen", "--part", "1/2", "-c", theirs]);
    assert_eq!(part.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&part.stderr);
    assert!(
        stderr.contains("delete that directory to discard it") && !stderr.contains("add --overwrite"),
        "{stderr}"
    );
    std::fs::remove_file(&manifest).unwrap();
    run_gen(dir, &["--part", "0/2", "-c", theirs]);
    run_gen(dir, &["--finalize", "-c", theirs]);
    assert!(cubeload(dir, &["verify", "cube.zarr"]).status.success());
}

#[test]
fn a_run_beside_another_run_of_the_same_cube_is_refused_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let text = inputs(dir);
    let config = config(dir, &text, "cube.zarr", 2);
    let config = config.to_str().unwrap();
    run_gen(dir, &["-c", config]);
    let cube = dir.join("cube.zarr");
    let before = stored_files(&cube);
    let lock_path = dir.join(".cube.zarr.cubeload-lock");
    assert!(!lock_path.exists(), "a run removes its lock file");
    let staging = dir.join(".cube.zarr.cubeload-partial");
    let staged = || staging.exists().then(|| stored_files(&staging));
    let refused = |args: &[&str]| {
        let staged_before = staged();
        let out = cubeload(dir, &[&["gen"], args, &["-c", config]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("another `cubeload gen` is writing this cube")
                && stderr.contains(&lock_path.display().to_string()),
            "{stderr}"
        );
        assert_eq!(staged(), staged_before, "{args:?} wrote into the staging directory");
    };

    // A whole run holds the lock (here this test, as another process would): every other run is refused.
    let held = std::fs::File::create(&lock_path).unwrap();
    held.try_lock().unwrap();
    // `info` shows the cube as it is, and that a run may replace it.
    let info = |args: &[&str]| String::from_utf8_lossy(&cubeload(dir, args).stdout).to_string();
    assert!(info(&["info", "cube.zarr"]).contains("running    a run of `cubeload gen` on this output"));
    assert!(info(&["info", "--json", "cube.zarr"]).contains("\"gen_running\": true"));
    refused(&["--overwrite"]);
    refused(&["--part", "0/2"]);
    refused(&["--finalize"]);
    // Refused before planning, which reads every input (here it would find none).
    let elsewhere = dir.join("elsewhere.yaml");
    let moved = std::fs::read_to_string(config).unwrap().replace("/inputs/", "/gone/");
    std::fs::write(&elsewhere, moved).unwrap();
    let out = cubeload(dir, &["gen", "--overwrite", "-c", elsewhere.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another `cubeload gen` is writing this cube") && !stderr.contains("gone"),
        "{stderr}"
    );
    drop(held);
    assert_eq!(stored_files(&cube), before, "the cube was touched");
    assert!(!info(&["info", "cube.zarr"]).contains("running"));
    assert!(info(&["info", "--json", "cube.zarr"]).contains("\"gen_running\": false"));
    // The land cover's fill value as the byte it is, the float32 field's NaN as null.
    let json: serde_json::Value = serde_json::from_str(&info(&["info", "--json", "cube.zarr"])).unwrap();
    let variable =
        |name: &str| json["variables"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap();
    assert_eq!(variable("landcover")["fill_value"], serde_json::json!(0), "{json}");
    assert!(variable("t2m")["fill_value"].is_null(), "{json}");

    // A part holds it: other parts run beside it, whole runs do not.
    let part = std::fs::File::open(&lock_path).unwrap();
    part.try_lock_shared().unwrap();
    run_gen(dir, &["--threads", "1", "--part", "0/2", "-c", config]);
    refused(&["--overwrite"]);
    drop(part);
    run_gen(dir, &["--part", "1/2", "-c", config]);
    run_gen(dir, &["--finalize", "--overwrite", "-c", config]);
    assert_eq!(stored_files(&cube), before);
    assert!(!lock_path.exists());
}

/// Makes a file made immutable (`chattr +i`) deletable again when dropped, whatever a test's outcome, so that
/// its temporary directory goes.
struct Unpin<'a>(&'a Path);

impl Drop for Unpin<'_> {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(self.0).status();
    }
}

/// A replaced cube the file system will not let the run delete (a cube of another user's; here, as root, a
/// file of it made immutable): the new cube is in place, and the run succeeds with a warning that says where
/// the old one is; the next run asks for it to be deleted before doing any work.
#[test]
fn a_replaced_cube_that_cannot_be_deleted_is_a_warning_and_stops_the_next_run_before_its_work() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let text = inputs(dir);
    run_gen(dir, &["-c", config(dir, &text, "cube.zarr", 2).to_str().unwrap()]);
    let pinned = dir.join(".cube.zarr.cubeload-superseded/cubeload_manifest.jsonl");
    let chattr = |flag: &str, path: &Path| Command::new("chattr").arg(flag).arg(path).status();
    if !chattr("+i", &dir.join("cube.zarr/cubeload_manifest.jsonl")).is_ok_and(|s| s.success()) {
        eprintln!("skipped: chattr +i needs root and a file system with attributes");
        return;
    }
    let _unpin = Unpin(&pinned);
    let config = config(dir, &text, "cube.zarr", 3);
    let config = config.to_str().unwrap();
    let out = cubeload(dir, &["gen", "--overwrite", "-c", config]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warning:") && stderr.contains("cannot be deleted"), "{stderr}");
    assert!(stderr.contains(".cube.zarr.cubeload-superseded"), "{stderr}");
    assert!(cubeload(dir, &["verify", "cube.zarr"]).status.success(), "the new cube is in place");
    let before = stored_files(&dir.join("cube.zarr"));

    let again = cubeload(dir, &["gen", "--overwrite", "-c", config]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot be deleted") && stderr.contains("delete it"), "{stderr}");
    assert!(!dir.join(".cube.zarr.cubeload-partial").exists(), "it did no work");
    assert_eq!(stored_files(&dir.join("cube.zarr")), before);
    assert!(chattr("-i", &pinned).unwrap().success());
    run_gen(dir, &["--overwrite", "-c", config]);
    assert!(!dir.join(".cube.zarr.cubeload-superseded").exists());
}

/// `Command::spawn` with captured output, to run several at once.
trait SpawnCaptured {
    fn output_async(&mut self) -> std::process::Child;
}

impl SpawnCaptured for Command {
    fn output_async(&mut self) -> std::process::Child {
        self.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }
}
