//! Cubes on an S3-compatible object store: a real S3 server (moto's, from PyPI, installed by
//! scripts/setup.sh) started on loopback; credentials and endpoint through the standard AWS variables.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cubeload::demo::{DemoSpec, IMAGE_LAYOUT, write_inputs};

/// A moto S3 server on a free loopback port, stopped on drop.
struct S3Server {
    child: Child,
    port: u16,
}

impl S3Server {
    fn start() -> S3Server {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
        assert!(python.exists(), "{} missing: run scripts/setup.sh", python.display());
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto server starts (pip install 'moto[server]')");
        let server = S3Server { child, port };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// One plain S3 request (moto accepts unsigned ones); asserts a 2xx status and returns the body.
    fn request(&self, method: &str, path: &str, body: &[u8]) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\r\n",
            self.port,
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(
            response.split(' ').nth(1).is_some_and(|status| status.starts_with('2')),
            "{method} {path}: {response}"
        );
        response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
    }

    /// Creates a bucket (S3's `PUT /bucket`).
    fn create_bucket(&self, name: &str) {
        self.request("PUT", &format!("/{name}"), b"");
    }

    /// The keys of bucket `cubes` under `prefix` (at most a thousand).
    fn keys(&self, prefix: &str) -> Vec<String> {
        let listing = self.request("GET", &format!("/cubes?list-type=2&prefix={prefix}"), b"");
        listing
            .split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</Key>"))
            .map(|(key, _)| key.to_string())
            .collect()
    }

    /// Runs the cubeload binary with the AWS environment of this server.
    fn cubeload(&self, cwd: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_cubeload"))
            .args(args)
            .current_dir(cwd)
            .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port))
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("TMPDIR", cwd)
            .output()
            .unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A config over demo inputs in `dir` writing to `output`.
fn config(dir: &Path, text: &str, output: &str, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text.replace(&format!("{}/demo.zarr", dir.display()), output)).unwrap();
    path
}

#[test]
fn gen_writes_to_s3_and_readers_read_it_back() {
    let server = S3Server::start();
    server.create_bucket("cubes");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let text = write_inputs(dir, &DemoSpec { layout: IMAGE_LAYOUT, ..DemoSpec::default() }).unwrap();
    let remote = config(dir, &text, "s3://cubes/eo/demo.zarr", "remote.yaml");
    let local = config(dir, &text, &format!("{}/local.zarr", dir.display()), "local.yaml");
    ok(&server.cubeload(dir, &["gen", "-c", local.to_str().unwrap()]));
    let stdout = ok(&server.cubeload(dir, &["gen", "-c", remote.to_str().unwrap()]));
    assert!(stdout.contains("wrote s3://cubes/eo/demo.zarr"), "{stdout}");
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .filter(|n| n.starts_with("cubeload-upload"))
        .collect();
    assert!(leftovers.is_empty(), "the local copy is removed after the upload: {leftovers:?}");

    // The same metadata and statistics as the local cube; the same pixels through the loader's reads.
    let info = |cube: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&server.cubeload(dir, &["info", "--json", cube]))).unwrap()
    };
    let (r, l) = (info("s3://cubes/eo/demo.zarr"), info("local.zarr"));
    assert_eq!(r["variables"], l["variables"]);
    assert_eq!(r["shape"], l["shape"]);
    for (cube, png) in [("s3://cubes/eo/demo.zarr", "remote.png"), ("local.zarr", "local.png")] {
        ok(&server.cubeload(dir, &["quicklook", cube, "ndvi", "--time", "48", "--out", png]));
    }
    assert_eq!(std::fs::read(dir.join("remote.png")).unwrap(), std::fs::read(dir.join("local.png")).unwrap());

    // An existing cube is replaced only with --overwrite.
    let again = server.cubeload(dir, &["gen", "-c", remote.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    ok(&server.cubeload(dir, &["gen", "--overwrite", "-c", remote.to_str().unwrap()]));
    assert_eq!(info("s3://cubes/eo/demo.zarr")["variables"], l["variables"]);

    // What is not there, or not reachable, is named.
    let missing = server.cubeload(dir, &["info", "s3://cubes/nothing.zarr"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("s3://cubes/nothing.zarr: no such cube"));
    let parts = server.cubeload(dir, &["gen", "--part", "0/2", "-c", remote.to_str().unwrap()]);
    assert_eq!(parts.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&parts.stderr);
    assert!(
        stderr.contains("need the cube on a filesystem") && !stderr.contains("cannot append"),
        "{stderr}"
    );
}

#[test]
fn an_overwrite_replaces_only_a_cubeload_cube_and_removes_the_objects_it_leaves() {
    let server = S3Server::start();
    server.create_bucket("cubes");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let text = write_inputs(dir, &DemoSpec { layout: IMAGE_LAYOUT, ..DemoSpec::default() }).unwrap();
    let url = "s3://cubes/eo/demo.zarr";
    let gen_ = |args: &[&str], config: &Path| {
        server.cubeload(dir, &[&["gen"], args, &["-c", config.to_str().unwrap()]].concat())
    };
    let all = config(dir, &text, url, "all.yaml");
    // The same cube without its static variable: the earlier cube's `landcover/` objects are then its own.
    let fewer: String =
        text.lines().filter(|l| !l.trim_start().starts_with("landcover:")).collect::<Vec<_>>().join("\n");
    assert_ne!(fewer, text);
    let fewer = config(dir, &fewer, url, "fewer.yaml");
    let variables = || -> serde_json::Value {
        let info: serde_json::Value =
            serde_json::from_str(&ok(&server.cubeload(dir, &["info", "--json", url]))).unwrap();
        info["variables"].as_array().unwrap().iter().map(|v| v["name"].clone()).collect()
    };

    ok(&gen_(&[], &all));
    assert_eq!(variables(), serde_json::json!(["t2m", "ndvi", "landcover"]));
    assert!(!server.keys("eo/demo.zarr/landcover/").is_empty());
    // Not the cube's: kept. A chunk no chunk of the new cube stores (left by an upload that stopped): removed.
    server.request("PUT", "/cubes/eo/demo.zarr/notes/readme.txt", b"the team's notes");
    server.request("PUT", "/cubes/eo/demo.zarr/t2m/c/99/0/0", b"stale");
    ok(&gen_(&["--overwrite"], &fewer));
    assert_eq!(variables(), serde_json::json!(["t2m", "ndvi"]));
    assert_eq!(server.keys("eo/demo.zarr/landcover/"), Vec::<String>::new());
    assert_eq!(server.keys("eo/demo.zarr/t2m/c/99/"), Vec::<String>::new());
    assert_eq!(server.keys("eo/demo.zarr/notes/"), ["eo/demo.zarr/notes/readme.txt"]);

    // An upload stopped before its root metadata leaves objects and no cube: a new cube is not written over
    // them unless asked.
    server.request("PUT", "/cubes/left.zarr/t2m/c/99/0/0", b"stale");
    let left = config(dir, &text, "s3://cubes/left.zarr", "left.yaml");
    let refused = gen_(&[], &left);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("did not finish")
            && stderr.contains("t2m/c/99/0/0")
            && stderr.contains("--overwrite"),
        "{stderr}"
    );
    ok(&gen_(&["--overwrite"], &left));
    assert_eq!(server.keys("left.zarr/t2m/c/99/"), Vec::<String>::new());
    assert!(!server.keys("left.zarr/t2m/").is_empty());

    // A Zarr store that cubeload did not make is never replaced, and is refused before a cube is made for it.
    server.request(
        "PUT",
        "/cubes/plain.zarr/zarr.json",
        br#"{"zarr_format":3,"node_type":"group","attributes":{}}"#,
    );
    server.request("PUT", "/cubes/plain.zarr/data/c/0", b"theirs");
    let plain = config(dir, &text, "s3://cubes/plain.zarr", "plain.yaml");
    let refused = gen_(&["--overwrite"], &plain);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("s3://cubes/plain.zarr") && stderr.contains("cubeload did not make"), "{stderr}");
    assert_eq!(server.keys("plain.zarr/"), ["plain.zarr/data/c/0", "plain.zarr/zarr.json"]);
    assert!(
        !std::fs::read_dir(dir).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("cubeload-upload"))
    );
}
