//! Cubes on an S3-compatible object store: a real S3 server (moto's, from PyPI, installed by
//! scripts/setup.sh) started on loopback; credentials and endpoint through the standard AWS variables.
//! cubeload reaches it through a proxy of the test's that counts requests by method and can refuse them, as
//! a store that stops accepting writes (or deletes) does.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cubeload::demo::{DemoSpec, IMAGE_LAYOUT, write_inputs};

/// A moto S3 server on a free loopback port behind a [`Proxy`], stopped on drop.
struct S3Server {
    child: Child,
    /// moto's port (the test's own requests).
    port: u16,
    /// The proxy's (cubeload's requests).
    proxy_port: u16,
    proxy: Arc<Proxy>,
}

/// Requests seen by method, and per method how many more are let through (then each is answered 403
/// AccessDenied, which clients do not retry).
#[derive(Default)]
struct Proxy {
    seen: Mutex<HashMap<String, usize>>,
    allowed: Mutex<HashMap<String, usize>>,
}

impl Proxy {
    /// Forwards one request of `client` to moto on `port` and its answer back, then closes (the answer
    /// says so: the client opens a connection per request).
    fn serve(&self, client: TcpStream, port: u16) -> std::io::Result<()> {
        let mut reader = BufReader::new(client.try_clone()?);
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" {
                break;
            }
            head.push(line);
        }
        let header = |name: &str| {
            head.iter().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case(name).then(|| value.trim().to_string())
            })
        };
        assert!(header("transfer-encoding").is_none(), "a chunked request: {head:?}");
        let mut body = vec![0; header("content-length").map_or(0, |n| n.parse().unwrap())];
        reader.read_exact(&mut body)?;
        let method = head[0].split(' ').next().unwrap_or_default().to_string();
        *self.seen.lock().unwrap().entry(method.clone()).or_default() += 1;
        let refused = self.allowed.lock().unwrap().get_mut(&method).is_some_and(|left| {
            let refused = *left == 0;
            *left = left.saturating_sub(1);
            refused
        });
        let mut client = client;
        if refused {
            let body = "<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>";
            return write!(
                client,
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
        let mut upstream = TcpStream::connect(("127.0.0.1", port))?;
        for line in head.iter().filter(|line| !line.to_ascii_lowercase().starts_with("connection:")) {
            upstream.write_all(line.as_bytes())?;
        }
        upstream.write_all(b"Connection: close\r\n\r\n")?;
        upstream.write_all(&body)?;
        let mut answer = Vec::new();
        upstream.read_to_end(&mut answer)?;
        let end = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP answer");
        let head = String::from_utf8_lossy(&answer[..end]);
        for line in head.split("\r\n").filter(|line| !line.to_ascii_lowercase().starts_with("connection:")) {
            write!(client, "{line}\r\n")?;
        }
        client.write_all(b"Connection: close\r\n")?;
        client.write_all(&answer[end + 2..])
    }
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
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy_port = listener.local_addr().unwrap().port();
        let proxy = Arc::new(Proxy::default());
        let serving = proxy.clone();
        // Serves until the test process ends.
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let proxy = serving.clone();
                std::thread::spawn(move || proxy.serve(client, port));
            }
        });
        let server = S3Server { child, port, proxy_port, proxy };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// cubeload's requests of `method` so far.
    fn seen(&self, method: &str) -> usize {
        self.proxy.seen.lock().unwrap().get(method).copied().unwrap_or(0)
    }

    /// Lets `n` more requests of `method` through, then refuses every one.
    fn refuse_after(&self, method: &str, n: usize) {
        self.proxy.allowed.lock().unwrap().insert(method.to_string(), n);
    }

    /// Lets every request through again.
    fn accept_all(&self) {
        self.proxy.allowed.lock().unwrap().clear();
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

    /// Runs the cubeload binary with the AWS environment of this server (through the proxy).
    fn cubeload(&self, cwd: &Path, args: &[&str]) -> Output {
        self.cubeload_with(cwd, args, &[])
    }

    /// [`S3Server::cubeload`] with `env` changed (`None`: removed).
    fn cubeload_with(&self, cwd: &Path, args: &[&str], env: &[(&str, Option<&str>)]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cubeload"));
        command
            .args(args)
            .current_dir(cwd)
            .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.proxy_port))
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("TMPDIR", cwd);
        for (key, value) in env {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        command.output().unwrap()
    }
}

/// The local copies of cubes to upload left in `dir` (the tests' `TMPDIR`).
fn upload_copies(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .filter(|n| n.starts_with("cubeload-upload"))
        .collect()
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
    assert_eq!(upload_copies(dir), Vec::<String>::new(), "the local copy is removed after the upload");

    // The same metadata and statistics as the local cube; the same pixels through the loader's reads.
    let info = |cube: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&server.cubeload(dir, &["info", "--json", cube]))).unwrap()
    };
    let (r, l) = (info("s3://cubes/eo/demo.zarr"), info("local.zarr"));
    assert_eq!(r["variables"], l["variables"]);
    assert_eq!(r["shape"], l["shape"]);
    // The size of all its files, from the manifest's records and seal: as the local cube's, but for the
    // output path written in the metadata.
    let size = |info: &serde_json::Value| info["bytes_on_disk"].as_f64().unwrap();
    assert!((size(&r) - size(&l)).abs() < 500.0, "{} against {}", size(&r), size(&l));
    for (cube, png) in [("s3://cubes/eo/demo.zarr", "remote.png"), ("local.zarr", "local.png")] {
        ok(&server.cubeload(dir, &["quicklook", cube, "ndvi", "--time", "48", "--out", png]));
    }
    assert_eq!(std::fs::read(dir.join("remote.png")).unwrap(), std::fs::read(dir.join("local.png")).unwrap());

    // An existing cube is replaced only with --overwrite.
    let again = server.cubeload(dir, &["gen", "-c", remote.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
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

/// The demo's inputs in `dir`, and configs writing its cube to `url`: all of it, and without its static
/// variable (the earlier cube's `landcover/` objects are then its own).
fn demo_configs(dir: &Path, url: &str) -> (PathBuf, PathBuf) {
    let text = write_inputs(dir, &DemoSpec { layout: IMAGE_LAYOUT, ..DemoSpec::default() }).unwrap();
    let fewer: String =
        text.lines().filter(|l| !l.trim_start().starts_with("landcover:")).collect::<Vec<_>>().join("\n");
    assert_ne!(fewer, text);
    (config(dir, &text, url, "all.yaml"), config(dir, &fewer, url, "fewer.yaml"))
}

/// `cubeload gen [args] -c config`.
fn gen_(server: &S3Server, dir: &Path, args: &[&str], config: &Path) -> Output {
    server.cubeload(dir, &[&["gen"], args, &["-c", config.to_str().unwrap()]].concat())
}

/// The names of the variables of the cube at `url`.
fn variables(server: &S3Server, dir: &Path, url: &str) -> serde_json::Value {
    let info: serde_json::Value =
        serde_json::from_str(&ok(&server.cubeload(dir, &["info", "--json", url]))).unwrap();
    info["variables"].as_array().unwrap().iter().map(|v| v["name"].clone()).collect()
}

#[test]
fn an_overwrite_replaces_only_a_cubeload_cube_and_removes_the_objects_it_leaves() {
    let server = S3Server::start();
    server.create_bucket("cubes");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let url = "s3://cubes/eo/demo.zarr";
    let (all, fewer) = demo_configs(dir, url);

    ok(&gen_(&server, dir, &[], &all));
    assert_eq!(variables(&server, dir, url), serde_json::json!(["t2m", "ndvi", "landcover"]));
    assert!(!server.keys("eo/demo.zarr/landcover/").is_empty());
    // A chunk under the cube's arrays that no chunk of the new cube replaces: the cube's, removed.
    server.request("PUT", "/cubes/eo/demo.zarr/t2m/c/99/0/0", b"stale");
    ok(&gen_(&server, dir, &["--overwrite"], &fewer));
    assert_eq!(variables(&server, dir, url), serde_json::json!(["t2m", "ndvi"]));
    assert_eq!(server.keys("eo/demo.zarr/landcover/"), Vec::<String>::new());
    assert_eq!(server.keys("eo/demo.zarr/t2m/c/99/"), Vec::<String>::new());
    assert_eq!(
        server.keys("eo/demo.zarr/cubeload_upload.json"),
        Vec::<String>::new(),
        "the journal is removed"
    );

    // Anything else under the URL is not replaced, nor mixed into a new cube: refused before a cube is made.
    server.request("PUT", "/cubes/eo/demo.zarr/notes/readme.txt", b"the team's notes");
    let refused = gen_(&server, dir, &["--overwrite"], &all);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(url) && stderr.contains("notes/readme.txt"), "{stderr}");
    assert_eq!(upload_copies(dir), Vec::<String>::new());
    assert_eq!(variables(&server, dir, url), serde_json::json!(["t2m", "ndvi"]));

    // Objects without a root metadata nor an upload's journal: anyone's, never replaced.
    server.request("PUT", "/cubes/left.zarr/t2m/c/99/0/0", b"stale");
    let left = config(dir, &std::fs::read_to_string(&all).unwrap(), "s3://cubes/left.zarr", "left.yaml");
    std::fs::write(&left, std::fs::read_to_string(&all).unwrap().replace(url, "s3://cubes/left.zarr"))
        .unwrap();
    for args in [&[][..], &["--overwrite"]] {
        let refused = gen_(&server, dir, args, &left);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("t2m/c/99/0/0") && stderr.contains("cubeload replaces only its own"),
            "{stderr}"
        );
    }
    assert_eq!(server.keys("left.zarr/"), ["left.zarr/t2m/c/99/0/0"]);

    // A Zarr store that cubeload did not make is never replaced, and is refused before a cube is made for it.
    server.request(
        "PUT",
        "/cubes/plain.zarr/zarr.json",
        br#"{"zarr_format":3,"node_type":"group","attributes":{}}"#,
    );
    server.request("PUT", "/cubes/plain.zarr/data/c/0", b"theirs");
    let plain = dir.join("plain.yaml");
    std::fs::write(&plain, std::fs::read_to_string(&all).unwrap().replace(url, "s3://cubes/plain.zarr"))
        .unwrap();
    let refused = gen_(&server, dir, &["--overwrite"], &plain);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("s3://cubes/plain.zarr") && stderr.contains("cubeload did not make"), "{stderr}");
    assert_eq!(server.keys("plain.zarr/"), ["plain.zarr/data/c/0", "plain.zarr/zarr.json"]);
    assert_eq!(upload_copies(dir), Vec::<String>::new());
}

/// A Zarr v2 store has no v3 root metadata, and nodes named like the new cube's: none of it is replaced,
/// with or without --overwrite, and the refusal comes before a cube is made.
#[test]
fn a_zarr_v2_store_is_refused_before_a_cube_is_made_and_left_whole() {
    let server = S3Server::start();
    server.create_bucket("cubes");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (all, _) = demo_configs(dir, "s3://cubes/v2.zarr");
    let store =
        [".zgroup", ".zmetadata", "t2m/.zarray", "t2m/0.0.0", "time/.zarray", "time/0", "precip/.zarray"];
    for key in store {
        server.request("PUT", &format!("/cubes/v2.zarr/{key}"), b"{}");
    }
    for args in [&[][..], &["--overwrite"]] {
        let refused = gen_(&server, dir, args, &all);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("s3://cubes/v2.zarr")
                && stderr.contains("7 objects")
                && stderr.contains(".zgroup"),
            "{stderr}"
        );
        assert!(!stderr.contains("pass --overwrite"), "{stderr}");
        assert_eq!(upload_copies(dir), Vec::<String>::new(), "refused before the cube is made");
    }
    let mut expected: Vec<String> = store.iter().map(|key| format!("v2.zarr/{key}")).collect();
    expected.sort();
    assert_eq!(server.keys("v2.zarr/"), expected);
}

/// A replacement stopped after the old root is gone is finished by the next run: the old cube's dropped
/// variable is removed even though no root names it any more.
#[test]
fn a_replacement_that_failed_is_finished_by_the_next_run() {
    let server = S3Server::start();
    server.create_bucket("cubes");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let url = "s3://cubes/k.zarr";
    let (all, fewer) = demo_configs(dir, url);
    ok(&gen_(&server, dir, &[], &all));
    let landcover = server.keys("k.zarr/landcover/");
    assert!(!landcover.is_empty());

    // Deletes (S3's bulk delete, a POST) refused after the write check's and the old root's: the upload
    // stops there.
    server.refuse_after("POST", 2);
    let failed = gen_(&server, dir, &["--overwrite"], &fewer);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    let copies = upload_copies(dir);
    assert_eq!(copies.len(), 1, "the local copy is kept: {copies:?}");
    assert!(
        stderr.contains(url) && stderr.contains(&copies[0]) && stderr.contains("run the same command again"),
        "{stderr}"
    );
    assert_eq!(server.keys("k.zarr/zarr.json"), Vec::<String>::new(), "no root: readers see no cube");
    server.accept_all();

    ok(&gen_(&server, dir, &["--overwrite"], &fewer));
    assert_eq!(variables(&server, dir, url), serde_json::json!(["t2m", "ndvi"]));
    assert_eq!(server.keys("k.zarr/landcover/"), Vec::<String>::new());
    assert_eq!(upload_copies(dir), Vec::<String>::new());

    // Writes refused in the middle of an upload: the same command resumes it, --overwrite or not; another
    // cube is not written over it unless asked.
    server.refuse_after("PUT", 4);
    let failed = gen_(&server, dir, &["--overwrite"], &all);
    assert_eq!(failed.status.code(), Some(1), "{}", String::from_utf8_lossy(&failed.stderr));
    assert_eq!(server.keys("k.zarr/zarr.json"), Vec::<String>::new());
    server.accept_all();
    let refused = gen_(&server, dir, &[], &fewer);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("did not finish") && stderr.contains("--overwrite"), "{stderr}");
    let stdout = ok(&gen_(&server, dir, &[], &all));
    assert!(stdout.contains("wrote s3://cubes/k.zarr"), "{stdout}");
    assert_eq!(variables(&server, dir, url), serde_json::json!(["t2m", "ndvi", "landcover"]));
    assert_eq!(server.keys("k.zarr/cubeload_upload.json"), Vec::<String>::new());
    assert_eq!(upload_copies(dir), Vec::<String>::new());
}

/// A local copy kept by a failed upload that has since lost files (as a run stopped while deleting its copy
/// left it, root and manifest still there) is made again, not uploaded: an upload deletes the objects its
/// copy lacks, which left a root over missing objects.
#[test]
fn a_kept_copy_that_lost_files_is_made_again_not_uploaded() {
    let server = S3Server::start();
    server.create_bucket("cubes");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (all, _) = demo_configs(dir, "s3://cubes/m.zarr");
    ok(&gen_(&server, dir, &[], &all));
    let complete = server.keys("m.zarr/");

    server.refuse_after("PUT", 4);
    let failed = gen_(&server, dir, &["--overwrite"], &all);
    assert_eq!(failed.status.code(), Some(1), "{}", String::from_utf8_lossy(&failed.stderr));
    server.accept_all();
    let copies = upload_copies(dir);
    assert_eq!(copies.len(), 1, "{copies:?}");
    let copy = dir.join(&copies[0]).join("cube.zarr");
    let lost = ["ndvi/zarr.json", "lon/c/0"];
    for file in lost {
        std::fs::remove_file(copy.join(file)).unwrap();
    }
    ok(&gen_(&server, dir, &["--overwrite"], &all));
    let keys = server.keys("m.zarr/");
    for file in lost {
        assert!(keys.contains(&format!("m.zarr/{file}")), "{file} is not uploaded");
    }
    assert_eq!(keys, complete, "the same objects as the first upload");
    assert_eq!(upload_copies(dir), Vec::<String>::new());
}

/// A missing bucket, no permission to write, an empty bucket name: said before a cube is made.
#[test]
fn what_would_fail_the_upload_is_found_before_the_cube_is_made() {
    let server = S3Server::start();
    server.create_bucket("cubes");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (all, _) = demo_configs(dir, "s3://cubes/eo/demo.zarr");
    let text = std::fs::read_to_string(&all).unwrap();
    let with_output = |url: &str, name: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text.replace("s3://cubes/eo/demo.zarr", url)).unwrap();
        path
    };

    let no_bucket = gen_(&server, dir, &[], &with_output("s3:///demo.zarr", "empty.yaml"));
    let stderr = String::from_utf8_lossy(&no_bucket.stderr);
    assert_eq!(no_bucket.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("`output`") && stderr.contains("no bucket"), "{stderr}");

    let missing = gen_(&server, dir, &[], &with_output("s3://nothing/demo.zarr", "missing.yaml"));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("bucket `nothing` does not exist"), "{stderr}");
    assert_eq!(upload_copies(dir), Vec::<String>::new());
    // Readers say so too, where a missing cube in a bucket that exists is "no such cube".
    let info = server.cubeload(dir, &["info", "s3://nothing/demo.zarr"]);
    let stderr = String::from_utf8_lossy(&info.stderr);
    assert_eq!(info.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bucket `nothing` does not exist") && !stderr.contains("no such cube"),
        "{stderr}"
    );
    let info = server.cubeload(dir, &["info", "s3://cubes/nothing.zarr"]);
    assert!(String::from_utf8_lossy(&info.stderr).contains("no such cube"));

    server.refuse_after("PUT", 0);
    let read_only = gen_(&server, dir, &[], &all);
    let stderr = String::from_utf8_lossy(&read_only.stderr);
    assert_eq!(read_only.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cubeload_probe") && stderr.contains("AWS_ACCESS_KEY_ID"), "{stderr}");
    assert_eq!(upload_copies(dir), Vec::<String>::new());
    server.accept_all();
    ok(&gen_(&server, dir, &[], &all));
    assert_eq!(server.keys("eo/demo.zarr/cubeload_probe"), Vec::<String>::new());
}

/// Settings that every request would fail for are named.
#[test]
fn missing_settings_are_named() {
    let server = S3Server::start();
    server.create_bucket("cubes");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let http = server.cubeload_with(dir, &["info", "s3://cubes/x.zarr"], &[("AWS_ALLOW_HTTP", None)]);
    let stderr = String::from_utf8_lossy(&http.stderr);
    assert_eq!(http.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("AWS_ALLOW_HTTP=true"), "{stderr}");
    // No credentials: the client asks the instance metadata service (here a closed port) for some.
    let no_credentials = server.cubeload_with(
        dir,
        &["info", "s3://cubes/x.zarr"],
        &[
            ("AWS_ACCESS_KEY_ID", None),
            ("AWS_SECRET_ACCESS_KEY", None),
            ("AWS_METADATA_ENDPOINT", Some("http://127.0.0.1:1")),
        ],
    );
    let stderr = String::from_utf8_lossy(&no_credentials.stderr);
    assert_eq!(no_credentials.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("AWS_ACCESS_KEY_ID") && stderr.contains("AWS_SECRET_ACCESS_KEY"), "{stderr}");
}

/// Each read of a chunk (or of a shard's index) is one GET: no HEAD asks its size first. Only opening the
/// cube asks the size of its root metadata.
#[test]
fn remote_reads_are_one_request_each() {
    let server = S3Server::start();
    server.create_bucket("cubes");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let url = "s3://cubes/eo/demo.zarr";
    let (all, _) = demo_configs(dir, url);
    ok(&gen_(&server, dir, &[], &all));
    for args in [&["info", url][..], &["quicklook", url, "ndvi", "--time", "48", "--out", "q.png"]] {
        let (heads, gets) = (server.seen("HEAD"), server.seen("GET"));
        ok(&server.cubeload(dir, args));
        let (heads, gets) = (server.seen("HEAD") - heads, server.seen("GET") - gets);
        eprintln!("{args:?}: {heads} HEAD and {gets} GET requests");
        assert!(heads <= 2, "{args:?}: {heads} HEAD and {gets} GET requests");
    }
}
