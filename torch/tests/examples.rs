//! The training examples as a user runs them: they train on the demo cube, and refuse a cube they cannot
//! train on with an `error:` line and exit 1 (a series of one step gave a libtorch panic, exit 101).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use cubeload::demo::{DemoSpec, build_cube};

/// An example's binary, which `cargo test` builds beside the test binaries (`target/<profile>/examples`),
/// no older than the sources it is built from (`cargo test --test examples` alone does not build it).
fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let path = deps.parent().unwrap().join("examples").join(name);
    let built = std::fs::metadata(&path).and_then(|m| m.modified());
    let torch = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = [torch.join("src"), torch.join("examples"), torch.join("../src")];
    let newest = sources.iter().map(|dir| newest_file(dir)).max().unwrap();
    assert!(
        built.as_ref().is_ok_and(|&built| built >= newest),
        "{} is missing or older than its sources: `cargo test` builds it, or `cargo build --release -p \
         cubeload-torch --examples`",
        path.display()
    );
    path
}

/// When the newest file under `dir` was modified, but the binaries' `main.rs`, which no example is built
/// from.
fn newest_file(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() == "main.rs" {
            continue;
        }
        let kind = entry.file_type().unwrap();
        let modified = if kind.is_dir() {
            newest_file(&entry.path())
        } else {
            entry.metadata().unwrap().modified().unwrap()
        };
        newest = newest.max(modified);
    }
    newest
}

fn run(name: &str, args: &[&str]) -> (Output, String) {
    let output = Command::new(example(name)).args(args).output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output, text)
}

#[test]
fn train_lstm_trains_on_the_demo_cube_and_refuses_series_of_one_step() {
    let (output, text) = run("train_lstm", &["demo", "2"]);
    assert!(output.status.success(), "{text}");
    let losses: Vec<f64> =
        text.lines().filter_map(|l| l.strip_prefix("epoch ")?.split(" loss ").nth(1)?.parse().ok()).collect();
    assert_eq!(losses.len(), 2, "one loss per epoch asked: {text}");
    assert!(losses.iter().all(|l| l.is_finite()) && losses[1] < losses[0], "the loss falls: {text}");

    let dir = tempfile::tempdir().unwrap();
    let spec = DemoSpec {
        hours: 24,
        layout: "{ kind: pixel_series, batch: 256, window: 1 }",
        ..DemoSpec::default()
    };
    let cube = build_cube(dir.path(), &spec, None).unwrap().path;
    let (output, text) = run("train_lstm", &[cube.to_str().unwrap(), "1"]);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("error: ") && text.contains("at least 2 (`layout.window`)"), "{text}");
}

#[test]
fn train_video_refuses_sequences_of_one_frame() {
    let dir = tempfile::tempdir().unwrap();
    let layout = "{ kind: image_sequence, seq_len: 1, patch: [16, 16], batch: 4 }";
    let spec = DemoSpec { hours: 24, layout, ..DemoSpec::default() };
    let cube = build_cube(dir.path(), &spec, None).unwrap().path;
    let (output, text) = run("train_video", &[cube.to_str().unwrap(), "1"]);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("error: ") && text.contains("at least 2 (`layout.seq_len`)"), "{text}");
    let (output, text) = run("train_video", &["--help"]);
    assert!(output.status.success() && text.contains("[CUBE|demo] [EPOCHS]"), "{text}");
}
