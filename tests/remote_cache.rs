//! Team sharing through a remote cache, end to end through the CLI, against a shared directory
//! and against a real S3-compatible server (moto) on 127.0.0.1 that the tests start.
//!
//! The S3 half needs Python with `moto[server]` (`tests/run.sh` installs it into `.venv`); the
//! interpreter is `$AUTOSCALE_TEST_PYTHON`, else `.venv/bin/python`. Without it those tests
//! print `SKIPPED:` and pass, unless `AUTOSCALE_REQUIRE_S3_TESTS=1` (CI) makes that a failure.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Workspace, stderr, stdout, with_outcome};
use serde_json::Value;

/// A secret that must never show in any output.
const SECRET: &str = "autoscale-test-secret-7f3a9c";

const PIPELINE: &str = r#"
name: team
stages:
  - id: shards
    kind: command
    inputs: {raw: file:data/raw.txt}
    cmd: "mkdir -p $AUTOSCALE_OUT/shards && split -l 2 $AUTOSCALE_INPUT_RAW $AUTOSCALE_OUT/shards/part- && seq 1 3000 > $AUTOSCALE_OUT/index.txt && echo sharded"
  - id: proxy
    kind: command
    matrix: {w: [0.25, 0.75]}
    inputs: {shards: shards}
    params: {w: "${matrix.w}"}
    cmd: "cat $AUTOSCALE_INPUT_SHARDS/shards/* | wc -c > $AUTOSCALE_OUT/loss.txt; echo $AUTOSCALE_PARAM_W >> $AUTOSCALE_OUT/loss.txt"
  - id: report
    kind: command
    inputs: {runs: proxy}
    cmd: "cat $AUTOSCALE_INPUT_RUNS/*/loss.txt > $AUTOSCALE_OUT/report.txt"
"#;

const STAGES: [&str; 4] = ["proxy[0.25]", "proxy[0.75]", "report", "shards"];

/// A remote the tests can look inside and tamper with.
trait TestRemote {
    /// What `--remote` takes.
    fn url(&self) -> String;
    /// Environment the binary needs to reach it.
    fn env(&self) -> Vec<(String, String)>;
    /// Object names under the remote's root (`v1/...`).
    fn list(&self) -> Vec<String>;
    fn read(&self, name: &str) -> Vec<u8>;
    fn write(&self, name: &str, bytes: &[u8]);
}

struct DirRemote {
    dir: tempfile::TempDir,
}

impl DirRemote {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
}

impl TestRemote for DirRemote {
    fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    fn env(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    fn list(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
                if e.file_type().expect("type").is_dir() {
                    stack.push(e.path());
                } else {
                    let rel = e
                        .path()
                        .strip_prefix(self.dir.path())
                        .expect("rel")
                        .to_owned();
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        out.retain(|n| !n.starts_with("v1/tmp/"));
        out.sort();
        out
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(name)).expect("read remote object")
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        let path = self.dir.path().join(name);
        let _ = std::fs::remove_file(&path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, bytes).expect("write remote object");
    }
}

/// One moto server for the whole test binary, on 127.0.0.1; each test gets its own bucket. The
/// server exits when this process closes its stdin, however this process ends.
struct Moto {
    port: u16,
    _child: Child,
}

static MOTO: OnceLock<Result<Moto, String>> = OnceLock::new();
static BUCKETS: AtomicUsize = AtomicUsize::new(0);

const MOTO_SERVE: &str = r#"
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()
server.stop()
"#;

fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AUTOSCALE_TEST_PYTHON").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    venv.exists().then_some(venv)
}

fn start_moto() -> Result<Moto, String> {
    let python = python().ok_or("no Python: set AUTOSCALE_TEST_PYTHON or create .venv")?;
    let probe = Command::new(&python)
        .args(["-c", "import moto.server"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !probe.status.success() {
        return Err(format!(
            "{} cannot import moto.server (pip install 'moto[server]')",
            python.display()
        ));
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let mut child = Command::new(&python)
        .args(["-c", MOTO_SERVE, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    let out = child.stdout.take().ok_or("no stdout")?;
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.trim() != "ready" {
        let _ = child.kill();
        return Err("moto did not start".into());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("moto never listened".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Moto {
        port,
        _child: child,
    })
}

struct S3Remote {
    port: u16,
    bucket: String,
}

impl S3Remote {
    /// A fresh bucket on the shared moto server, or `None` (after a loud `SKIPPED:`).
    fn start(test: &str) -> Option<Self> {
        match MOTO.get_or_init(start_moto) {
            Ok(moto) => {
                let n = BUCKETS.fetch_add(1, Ordering::SeqCst);
                let remote = Self {
                    port: moto.port,
                    bucket: format!("team-cache-{n}"),
                };
                let (status, body) = remote.http("PUT", &format!("/{}", remote.bucket), &[]);
                assert_eq!(
                    status,
                    200,
                    "create bucket: {}",
                    String::from_utf8_lossy(&body)
                );
                Some(remote)
            }
            Err(why) => {
                if std::env::var("AUTOSCALE_REQUIRE_S3_TESTS").is_ok_and(|v| v == "1") {
                    panic!("{test}: the S3 tests are required here, but {why}");
                }
                let _ = writeln!(
                    std::io::stderr(),
                    "\n*** SKIPPED: {test} against S3: {why} ***\n"
                );
                None
            }
        }
    }

    fn key(&self, name: &str) -> String {
        format!("/{}/team/{name}", self.bucket)
    }

    /// One plain HTTP/1.1 request to moto. Moto checks no signatures (S3 would), but treats a
    /// request without an `Authorization` header as anonymous, so a placeholder one is sent.
    fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to moto");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00\r\n\
             Connection: close\r\n\r\n",
            self.port,
            body.len()
        );
        stream.write_all(head.as_bytes()).expect("send");
        stream.write_all(body).expect("send body");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).expect("receive");
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("response head");
        let head = String::from_utf8_lossy(&response[..split]).to_string();
        let mut body = response[split + 4..].to_vec();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        (status, body)
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..end])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 2 + size + 2..];
    }
}

impl TestRemote for S3Remote {
    fn url(&self) -> String {
        format!("s3://{}/team", self.bucket)
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            (
                "AWS_ENDPOINT_URL".into(),
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
        ]
    }

    fn list(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/{}?list-type=2&prefix=team/", self.bucket);
            if let Some(t) = &token {
                path.push_str(&format!("&continuation-token={}", url_escape(t)));
            }
            let (status, body) = self.http("GET", &path, &[]);
            assert_eq!(status, 200);
            let xml = String::from_utf8_lossy(&body).to_string();
            for part in xml.split("<Key>").skip(1) {
                let key = part.split("</Key>").next().unwrap_or("");
                names.push(key.trim_start_matches("team/").to_string());
            }
            token = xml
                .split("<NextContinuationToken>")
                .nth(1)
                .and_then(|p| p.split("</NextContinuationToken>").next())
                .map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        names.sort();
        names
    }

    fn read(&self, name: &str) -> Vec<u8> {
        let (status, body) = self.http("GET", &self.key(name), &[]);
        assert_eq!(status, 200, "read {name}");
        body
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        let (status, _) = self.http("PUT", &self.key(name), bytes);
        assert_eq!(status, 200, "write {name}");
    }
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A team member: a workspace with the pipeline, its data and a cache of its own.
fn member(remote: &dyn TestRemote) -> Member<'_> {
    let ws = Workspace::new();
    ws.write("p.yaml", PIPELINE);
    let raw: String = (0..40)
        .map(|i| format!("document {i} of the corpus\n"))
        .collect();
    ws.write("data/raw.txt", &raw);
    Member { ws, remote }
}

struct Member<'r> {
    ws: Workspace,
    remote: &'r dyn TestRemote,
}

impl Member<'_> {
    /// The binary with the remote named on the command line.
    fn cmd(&self, args: &[&str]) -> Command {
        let url = self.remote.url();
        let mut all = vec!["--remote", url.as_str()];
        all.extend_from_slice(args);
        let mut cmd = self.ws.cmd(&all);
        cmd.env_remove("AUTOSCALE_REMOTE")
            .env_remove("AUTOSCALE_REMOTE_MODE")
            .env("AUTOSCALE_REMOTE_TIMEOUT", "10");
        for (k, v) in self.remote.env() {
            cmd.env(k, v);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let out = self.cmd(args).output().expect("run autoscale");
        let all = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!all.contains(SECRET), "a credential leaked: {all}");
        out
    }

    /// `--json run p.yaml EXTRA...`: exit code and events.
    fn run_json(&self, extra: &[&str]) -> (i32, Vec<Value>) {
        let mut args = vec!["--json", "run", "p.yaml"];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        (out.status.code().unwrap_or(-1), common::events(&out))
    }

    /// Each stage's status object, by stage id.
    fn status(&self, extra: &[&str]) -> (std::collections::BTreeMap<String, Value>, String) {
        let mut args = vec!["--json", "status", "p.yaml"];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let map = common::events(&out)
            .into_iter()
            .filter_map(|v| Some((v["stage"].as_str()?.to_string(), v)))
            .collect();
        (map, stderr(&out))
    }

    fn output(&self, stage: &str, file: &str) -> String {
        let out = self.run(&["--json", "show", "p.yaml", stage]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let shown: Value = serde_json::from_str(stdout(&out).trim()).expect("json");
        let dir = shown["dir"].as_str().expect("dir");
        std::fs::read_to_string(Path::new(dir).join(file)).expect("read output")
    }
}

fn warnings(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["event"] == "warning")
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect()
}

fn entries(remote: &dyn TestRemote) -> Vec<String> {
    remote
        .list()
        .into_iter()
        .filter(|n| n.starts_with("v1/actions/"))
        .collect()
}

/// Every entry on the remote names only blobs that are there: what a killed upload must never
/// break.
fn assert_entries_complete(remote: &dyn TestRemote) {
    let names = remote.list();
    for entry in names.iter().filter(|n| n.starts_with("v1/actions/")) {
        let v: Value = serde_json::from_slice(&remote.read(entry)).expect("entry json");
        let m = &v["manifest"];
        let digests = m["files"]
            .as_array()
            .expect("files")
            .iter()
            .map(|f| f["digest"].as_str().expect("digest").to_string())
            .chain(m["log"].as_str().map(str::to_string));
        for d in digests {
            let raw = format!("v1/blobs/{}/{d}", &d[..2]);
            let zst = format!("{raw}.zst");
            assert!(
                names.contains(&raw) || names.contains(&zst),
                "{entry} names blob {d}, which the remote lacks"
            );
        }
    }
}

/// The remote object holding a stage's output file, as member `m` sees it.
fn blob_of(m: &Member<'_>, stage: &str, file: &str) -> (String, Vec<String>) {
    let out = m.run(&["--json", "show", "p.yaml", stage]);
    let shown: Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    let digest = shown["files"]
        .as_array()
        .expect("files")
        .iter()
        .find(|f| f["path"] == file)
        .and_then(|f| f["digest"].as_str())
        .expect("digest")
        .to_string();
    let names = m.remote.list();
    let name = names
        .iter()
        .find(|n| n.contains(&digest) && n.starts_with("v1/blobs/"))
        .expect("blob on the remote")
        .clone();
    (name, names)
}

fn entry_of(m: &Member<'_>, stage: &str) -> String {
    let (statuses, _) = m.status(&[]);
    let key = statuses[stage]["key"].as_str().expect("key").to_string();
    format!("v1/actions/{}/{key}.json", &key[..2])
}

// ---------------------------------------------------------------------------------------------

fn member_b_downloads_instead_of_executing(remote: &dyn TestRemote) {
    let a = member(remote);
    let (code, events) = a.run_json(&[]);
    assert_eq!(code, 0, "{events:?}");
    assert_eq!(with_outcome(&events, "executed"), STAGES);
    assert!(warnings(&events).is_empty(), "{events:?}");
    assert_eq!(entries(remote).len(), 4, "every result is uploaded");
    assert_entries_complete(remote);

    let b = member(remote);
    let (status, _) = b.status(&[]);
    for stage in STAGES {
        assert_eq!(status[stage]["state"], "cached", "{stage}: {status:?}");
        assert_eq!(status[stage]["remote"], true, "{stage} is a remote hit");
    }
    // -vv logs every request: still no credential in it (`run` checks every output).
    let text = stdout(&b.run(&["-vv", "status", "p.yaml"]));
    assert!(
        text.contains("remote  shards") && text.contains("4 of them in the remote cache"),
        "{text}"
    );
    let (code, events) = b.run_json(&[]);
    assert_eq!(code, 0, "{events:?}");
    assert!(with_outcome(&events, "executed").is_empty(), "{events:?}");
    assert_eq!(with_outcome(&events, "cached"), STAGES);
    let summary = events
        .iter()
        .find(|e| e["event"] == "summary")
        .expect("summary");
    assert_eq!(summary["summary"]["executed"], 0);
    assert_eq!(
        b.output("report", "report.txt"),
        a.output("report", "report.txt")
    );
    // Now local: the same status with the remote off.
    let (status, _) = b.status(&["--remote-mode", "off"]);
    for stage in STAGES {
        assert_eq!(status[stage]["state"], "cached");
        assert!(
            status[stage].get("remote").is_none(),
            "{stage} is local now"
        );
    }
    let verify = b.run(&["cache", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", stdout(&verify));
}

fn a_tampered_blob_is_detected_and_not_used(remote: &dyn TestRemote) {
    let a = member(remote);
    assert_eq!(a.run_json(&[]).0, 0);
    let (name, _) = blob_of(&a, "shards", "index.txt");
    let good = a.output("shards", "index.txt");
    let evil = if name.ends_with(".zst") {
        zstd_frame_of(b"rm -rf /\n")
    } else {
        b"rm -rf /\n".to_vec()
    };
    remote.write(&name, &evil);

    let b = member(remote);
    let (code, events) = b.run_json(&[]);
    assert_eq!(code, 0, "{events:?}");
    assert_eq!(
        with_outcome(&events, "executed"),
        ["shards"],
        "the bad entry is not used; its dependents are still remote hits"
    );
    let w = warnings(&events);
    assert!(
        w.iter()
            .any(|m| m.contains("corrupt") || m.contains("not valid zstd")),
        "{w:?}"
    );
    assert_eq!(b.output("shards", "index.txt"), good);
    let verify = b.run(&["cache", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", stdout(&verify));
}

/// A zstd frame of raw (stored) blocks, enough for the tampering test without a zstd crate.
fn zstd_frame_of(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0x28, 0xB5, 0x2F, 0xFD];
    // Frame header: single segment, 1-byte content size.
    out.push(0x20);
    out.push(bytes.len() as u8);
    // One last raw block: header = last(1) | type raw(0) << 1 | size << 3.
    let header = 1u32 | ((bytes.len() as u32) << 3);
    out.extend_from_slice(&header.to_le_bytes()[..3]);
    out.extend_from_slice(bytes);
    out
}

fn a_killed_upload_leaves_no_entry_without_its_blobs(remote: &dyn TestRemote) {
    let a = member(remote);
    // Many small outputs make the upload long enough to kill in the middle.
    let many: String = PIPELINE.to_string()
        + r#"
  - id: many
    kind: command
    inputs: {shards: shards}
    cmd: "for i in $(seq 1 400); do echo file $i > $AUTOSCALE_OUT/f$i.txt; done"
"#;
    a.ws.write("p.yaml", &many);
    let (code, _) = a.run_json(&["--remote-mode", "off"]);
    assert_eq!(code, 0);
    assert!(
        remote.list().is_empty(),
        "nothing is uploaded with the remote off"
    );

    let mut push = a
        .cmd(&["cache", "push"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn push");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut killed_mid_upload = false;
    loop {
        if push.try_wait().expect("try_wait").is_some() {
            break;
        }
        let blobs = remote
            .list()
            .iter()
            .filter(|n| n.starts_with("v1/blobs/"))
            .count();
        if blobs >= 20 {
            push.kill().expect("kill");
            killed_mid_upload = true;
            break;
        }
        assert!(Instant::now() < deadline, "push never started uploading");
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = push.wait();
    assert!(
        killed_mid_upload,
        "the push finished before it could be killed"
    );
    assert!(
        entries(remote).len() < 5,
        "the upload was cut short: {:?}",
        entries(remote)
    );
    assert_entries_complete(remote);

    // Whatever the kill left, another member's run completes; what is missing runs there.
    let b = member(remote);
    b.ws.write("p.yaml", &many);
    let (code, events) = b.run_json(&[]);
    assert_eq!(code, 0, "{events:?}");
    let w = warnings(&events);
    assert!(w.is_empty(), "a half upload is a plain miss: {w:?}");
    assert_entries_complete(remote);
    // A push finishes the job; a third member then runs nothing.
    let again = a.run(&["cache", "push"]);
    assert_eq!(again.status.code(), Some(0), "{}", stdout(&again));
    assert_eq!(entries(remote).len(), 5);
    let c = member(remote);
    c.ws.write("p.yaml", &many);
    let (code, events) = c.run_json(&[]);
    assert_eq!(code, 0);
    assert!(with_outcome(&events, "executed").is_empty(), "{events:?}");
}

fn untrusted_entries_are_refused(remote: &dyn TestRemote) {
    let a = member(remote);
    assert_eq!(a.run_json(&[]).0, 0);
    let name = entry_of(&a, "shards");
    let original: Value = serde_json::from_slice(&remote.read(&name)).expect("entry");
    type Tamper = fn(&mut Value);
    let cases: [(&str, Tamper); 4] = [
        ("not a plain relative path", |v| {
            v["manifest"]["files"][0]["path"] = "../../../../etc/cron.d/evil".into()
        }),
        ("schema version 99", |v| v["manifest"]["schema"] = 99.into()),
        ("format is 2", |v| v["format"] = 2.into()),
        ("more than the limit", |v| {
            v["manifest"]["files"][0]["size"] = 9_000_000_000_000_000u64.into()
        }),
    ];
    for (expected, tamper) in cases {
        let mut v = original.clone();
        tamper(&mut v);
        remote.write(&name, &serde_json::to_vec(&v).expect("json"));
        let b = member(remote);
        let (status, err) = b.status(&[]);
        assert_eq!(
            status["shards"]["state"], "will_run",
            "{expected}: {status:?}"
        );
        assert!(
            err.contains("warning: remote cache") && err.contains(expected),
            "{expected}: {err}"
        );
        assert!(
            !b.ws.path().join("etc").exists() && !Path::new("/etc/cron.d/evil").exists(),
            "nothing is written outside the cache"
        );
    }
}

fn a_remote_that_is_down_warns_and_the_run_completes(remote: &dyn TestRemote) {
    // Member A filled the remote; then it goes away.
    let _ = remote;
    let ws = member(remote);
    let started = Instant::now();
    let out = ws
        .cmd(&["--json", "run", "p.yaml"])
        .env("AUTOSCALE_REMOTE_TIMEOUT", "2")
        .output()
        .expect("run");
    let events = common::events(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(with_outcome(&events, "executed"), STAGES);
    let w = warnings(&events);
    assert_eq!(w.len(), 1, "one warning, not one per stage: {w:?}");
    assert!(
        w[0].contains("local cache only")
            && (w[0].contains("unreachable") || w[0].contains("did not answer")),
        "{w:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "bounded time-outs: {:?}",
        started.elapsed()
    );
}

/// A remote that does not answer: a listener that accepts connections and never replies.
struct BlackHole {
    port: u16,
}

impl BlackHole {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
                if held.len() > 64 {
                    break;
                }
            }
        });
        Self { port }
    }
}

impl TestRemote for BlackHole {
    fn url(&self) -> String {
        "s3://team-cache/team".into()
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            (
                "AWS_ENDPOINT_URL".into(),
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
        ]
    }

    fn list(&self) -> Vec<String> {
        Vec::new()
    }

    fn read(&self, _: &str) -> Vec<u8> {
        Vec::new()
    }

    fn write(&self, _: &str, _: &[u8]) {}
}

/// A directory remote that is not mounted.
struct Unmounted;

impl TestRemote for Unmounted {
    fn url(&self) -> String {
        "/nonexistent/autoscale-team-cache".into()
    }

    fn env(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    fn list(&self) -> Vec<String> {
        Vec::new()
    }

    fn read(&self, _: &str) -> Vec<u8> {
        Vec::new()
    }

    fn write(&self, _: &str, _: &[u8]) {}
}

fn push_and_pull_sync_explicitly(remote: &dyn TestRemote) {
    let a = member(remote);
    assert_eq!(a.run_json(&["--remote-mode", "off"]).0, 0);
    assert!(entries(remote).is_empty());
    let pushed = a.run(&["cache", "push", "p.yaml"]);
    assert_eq!(pushed.status.code(), Some(0), "{}", stderr(&pushed));
    assert!(
        stdout(&pushed).contains("pushed 4 results"),
        "{}",
        stdout(&pushed)
    );
    assert_eq!(entries(remote).len(), 4);
    assert_entries_complete(remote);
    let read_only = a.run(&["--remote-mode", "read-only", "cache", "push"]);
    assert_eq!(read_only.status.code(), Some(2), "{}", stderr(&read_only));
    assert!(
        stderr(&read_only).contains("read-only"),
        "{}",
        stderr(&read_only)
    );

    let b = member(remote);
    let pulled = b.run(&["--json", "cache", "pull", "p.yaml"]);
    assert_eq!(pulled.status.code(), Some(0), "{}", stderr(&pulled));
    let report: Value = serde_json::from_str(stdout(&pulled).trim()).expect("json");
    assert_eq!(report["report"]["transferred"], 4, "{report}");
    let (status, _) = b.status(&["--remote-mode", "off"]);
    assert!(
        STAGES.iter().all(|s| status[*s]["state"] == "cached"),
        "{status:?}"
    );

    let c = member(remote);
    let everything = c.run(&["cache", "pull"]);
    assert_eq!(everything.status.code(), Some(0), "{}", stderr(&everything));
    assert!(
        stdout(&everything).contains("pulled 4 results"),
        "{}",
        stdout(&everything)
    );
}

/// Four members finish the same stages at the same moment: the create-only uploads race, every
/// run succeeds without a warning, and the remote ends with one complete entry per stage.
fn concurrent_members_publish_each_result_once(remote: &dyn TestRemote) {
    let members: Vec<Member<'_>> = (0..4).map(|_| member(remote)).collect();
    let children: Vec<_> = members
        .iter()
        .map(|m| {
            m.cmd(&["--json", "run", "p.yaml"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn a member's run")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let events = common::events(&out);
        assert!(warnings(&events).is_empty(), "{:?}", warnings(&events));
    }
    assert_eq!(entries(remote).len(), STAGES.len(), "{:?}", entries(remote));
    assert_entries_complete(remote);
    let first = members[0].output("report", "report.txt");
    for m in &members[1..] {
        assert_eq!(m.output("report", "report.txt"), first);
    }
}

// ---------------------------------------------------------------------------------------------

macro_rules! against_both {
    ($($name:ident),* $(,)?) => {
        mod directory {
            $(
                #[test]
                fn $name() {
                    super::$name(&super::DirRemote::new());
                }
            )*
        }
        mod s3 {
            $(
                #[test]
                fn $name() {
                    if let Some(remote) = super::S3Remote::start(stringify!($name)) {
                        super::$name(&remote);
                    }
                }
            )*
        }
    };
}

against_both!(
    member_b_downloads_instead_of_executing,
    a_tampered_blob_is_detected_and_not_used,
    a_killed_upload_leaves_no_entry_without_its_blobs,
    untrusted_entries_are_refused,
    push_and_pull_sync_explicitly,
    concurrent_members_publish_each_result_once,
);

#[test]
fn an_unmounted_directory_remote_warns_and_the_run_completes() {
    a_remote_that_is_down_warns_and_the_run_completes(&Unmounted);
}

#[test]
fn an_s3_remote_that_refuses_connections_warns_and_the_run_completes() {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut dead = BlackHole::start();
    dead.port = port;
    a_remote_that_is_down_warns_and_the_run_completes(&dead);
}

#[test]
fn an_s3_remote_that_never_answers_times_out_and_the_run_completes() {
    a_remote_that_is_down_warns_and_the_run_completes(&BlackHole::start());
}

#[test]
fn the_remote_comes_from_autoscale_toml_and_flags_override_it() {
    let remote = DirRemote::new();
    let a = member(&remote);
    assert_eq!(a.run_json(&[]).0, 0);
    let ws = Workspace::new();
    ws.write("p.yaml", PIPELINE);
    let raw: String = (0..40)
        .map(|i| format!("document {i} of the corpus\n"))
        .collect();
    ws.write("data/raw.txt", &raw);
    ws.write(
        "autoscale.toml",
        &format!(
            "[remote]\nurl = \"{}\"\nmode = \"read-only\"\n",
            remote.url()
        ),
    );
    let status = |extra: &[&str]| {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        args.extend(["status", "p.yaml"]);
        let out = ws
            .cmd(&args)
            .env_remove("AUTOSCALE_REMOTE")
            .env_remove("AUTOSCALE_REMOTE_MODE")
            .output()
            .expect("status");
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        common::events(&out)
            .into_iter()
            .filter(|v| v["remote"] == true)
            .count()
    };
    assert_eq!(status(&[]), 4, "autoscale.toml names the remote");
    assert_eq!(
        status(&["--remote-mode", "off"]),
        0,
        "a flag overrides the file"
    );
    let out = ws
        .cmd(&["status", "p.yaml"])
        .env("AUTOSCALE_REMOTE_MODE", "off")
        .output()
        .expect("status");
    assert!(
        !stdout(&out).contains("remote "),
        "the env overrides the file"
    );
    // Read-only: what runs here is not uploaded.
    let before = remote.list().len();
    ws.write("data/raw.txt", "other data\n");
    let out = ws.cmd(&["--json", "run", "p.yaml"]).output().expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        with_outcome(&common::events(&out), "executed"),
        STAGES,
        "new data: everything runs here"
    );
    assert_eq!(remote.list().len(), before, "and nothing is uploaded");

    ws.write("autoscale.toml", "[remote]\nurl = \"x\"\nmdoe = \"off\"\n");
    let out = ws.run(&["status", "p.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("autoscale.toml") && err.contains("line 3"),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");
}

#[test]
fn credentials_never_go_in_a_url_and_never_show() {
    let ws = Workspace::new();
    ws.write("p.yaml", PIPELINE);
    ws.write("data/raw.txt", "data\n");
    let out = ws.run(&[
        "--remote",
        &format!("s3://AKIAEXAMPLE:{SECRET}@team-cache/p"),
        "status",
        "p.yaml",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!all.contains(SECRET), "{all}");
    assert!(all.contains("credentials never go in the URL"), "{all}");
    let out = ws.run(&["--remote", "gs://bucket", "status", "p.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("`gcp`"), "{}", stderr(&out));
}
