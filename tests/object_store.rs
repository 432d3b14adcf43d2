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

    /// Creates a bucket (S3's `PUT /bucket`); moto accepts unsigned requests.
    fn create_bucket(&self, name: &str) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(stream, "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\r\n", self.port)
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        assert_eq!(&head[9..12], b"200", "{}", String::from_utf8_lossy(&head));
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
    assert!(String::from_utf8_lossy(&parts.stderr).contains("need the cube on a filesystem"));
}
