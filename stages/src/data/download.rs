//! `download`: fetches sources into the stage's output: `https://`, `http://`, `file://` URLs
//! and local paths (relative to the workspace root).
//!
//! - HTTP bodies stream to a partial file in the stage's scratch space, which survives a killed
//!   run: the next attempt, or the next run of the same key, resumes it with a `Range` request
//!   (guarded by `If-Range` with the server's validator), or starts over when the server
//!   ignores the range.
//! - Failures that may pass (no connection, timeouts, a cut-off body, 429, 5xx) are retried
//!   `retries` times with exponential backoff; others (404, say) fail at once. When no attempt
//!   reached a server, the error says the machine looks offline.
//! - A declared `sha256` or `blake3` must match, or the file is refused and deleted.
//! - The key is the source list (URLs and checksums), not the remote bytes: declare a checksum,
//!   or change the URL, to fetch new content. Local data that changes belongs in a `file:`
//!   input, which the engine hashes.
//!
//! Outputs: each source at its `path` (default: the URL's file name), and `sources.json` with
//! every file's URL, size, sha256 and blake3.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use autoscale_engine::{Implementation, ParamSpec, ParamType, StageContext, StageError, StageKind};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::{DataError, float_param, int_param, write_json};

pub(crate) const SOURCES_FILE: &str = "sources.json";

pub struct DownloadKind;

const PARAMS: &[ParamSpec] = &[
    ParamSpec::required(
        "sources",
        ParamType::List,
        "URLs or paths, or maps {url, path, sha256, blake3}: https://, http://, file://, or a path under the workspace root",
    ),
    ParamSpec::optional(
        "retries",
        ParamType::Int,
        "retries of a failure that may pass (network, timeout, 429, 5xx) [default: 4]",
    ),
    ParamSpec::optional(
        "backoff_s",
        ParamType::Float,
        "wait before the first retry, doubling after each [default: 1.0]",
    ),
    ParamSpec::optional(
        "timeout_s",
        ParamType::Float,
        "timeout to connect and for each read [default: 30]",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algo {
    Sha256,
    Blake3,
}

impl Algo {
    fn name(self) -> &'static str {
        match self {
            Algo::Sha256 => "sha256",
            Algo::Blake3 => "blake3",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Http(String),
    File(PathBuf),
}

#[derive(Debug, Clone)]
struct Source {
    /// As written in the pipeline.
    url: String,
    location: Location,
    /// Where it lands under the output.
    path: String,
    checksums: Vec<(Algo, String)>,
}

#[derive(Debug, Clone)]
struct DownloadConfig {
    sources: Vec<Source>,
    retries: u32,
    backoff: Duration,
    timeout: Duration,
}

fn param_err(message: String) -> DataError {
    DataError::Param {
        name: "sources".into(),
        message,
    }
}

impl DownloadConfig {
    fn from_params(params: &Map<String, Value>) -> Result<Self, DataError> {
        let list = params
            .get("sources")
            .and_then(Value::as_array)
            .ok_or_else(|| param_err("must be a list of URLs, paths or maps".into()))?;
        if list.is_empty() {
            return Err(param_err("must list at least one source".into()));
        }
        let mut sources = Vec::new();
        let mut paths = BTreeSet::new();
        for (i, entry) in list.iter().enumerate() {
            let source = parse_source(entry).map_err(|m| param_err(format!("entry {i}: {m}")))?;
            if !paths.insert(source.path.clone()) {
                return Err(param_err(format!(
                    "entry {i}: two sources land at `{}`; give one a different `path`",
                    source.path
                )));
            }
            sources.push(source);
        }
        let retries = int_param(params, "retries", 4)?;
        let seconds = |name: &str, default: f64| -> Result<Duration, DataError> {
            let s = float_param(params, name, default)?;
            if !(0.0..=86_400.0).contains(&s) {
                return Err(DataError::Param {
                    name: name.into(),
                    message: format!("must be between 0 and 86400 seconds, not {s}"),
                });
            }
            Ok(Duration::from_secs_f64(s))
        };
        Ok(Self {
            sources,
            retries: u32::try_from(retries.min(100)).unwrap_or(100),
            backoff: seconds("backoff_s", 1.0)?,
            timeout: seconds("timeout_s", 30.0)?.max(Duration::from_millis(1)),
        })
    }
}

fn parse_source(entry: &Value) -> Result<Source, String> {
    let (url, path, checksums) = match entry {
        Value::String(url) => (url.clone(), None, Vec::new()),
        Value::Object(map) => {
            for key in map.keys() {
                if !["url", "path", "sha256", "blake3"].contains(&key.as_str()) {
                    return Err(format!(
                        "unknown field `{key}` (fields: url, path, sha256, blake3)"
                    ));
                }
            }
            let url = map
                .get("url")
                .and_then(Value::as_str)
                .ok_or("a map needs a string `url`")?
                .to_string();
            let path = match map.get("path") {
                None => None,
                Some(p) => Some(p.as_str().ok_or("`path` must be a string")?.to_string()),
            };
            let mut checksums = Vec::new();
            for algo in [Algo::Sha256, Algo::Blake3] {
                if let Some(v) = map.get(algo.name()) {
                    let hex = v
                        .as_str()
                        .ok_or_else(|| format!("`{}` must be a hex string", algo.name()))?
                        .to_ascii_lowercase();
                    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                        return Err(format!(
                            "`{}` must be 64 hex digits, not `{hex}`",
                            algo.name()
                        ));
                    }
                    checksums.push((algo, hex));
                }
            }
            (url, path, checksums)
        }
        other => return Err(format!("`{other}` is neither a URL nor a map")),
    };
    let location = if url.starts_with("https://") || url.starts_with("http://") {
        Location::Http(url.clone())
    } else if let Some(rest) = url.strip_prefix("file://") {
        Location::File(PathBuf::from(rest))
    } else if let Some((scheme, _)) = url.split_once("://") {
        return Err(format!(
            "unsupported scheme `{scheme}://` in `{url}` (https, http, file, or a local path)"
        ));
    } else {
        Location::File(PathBuf::from(&url))
    };
    let path = match path {
        Some(p) => p,
        None => {
            let without_query = url.split(['?', '#']).next().unwrap_or(&url);
            without_query
                .rsplit('/')
                .next()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| format!("cannot name a file after `{url}`; give it a `path`"))?
                .to_string()
        }
    };
    let p = Path::new(&path);
    if path.is_empty()
        || p.is_absolute()
        || p.components().any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(format!(
            "`path` must be a relative path inside the output, without `..`, not `{path}`"
        ));
    }
    if path == SOURCES_FILE {
        return Err(format!(
            "`path` may not be `{SOURCES_FILE}`, which the stage writes"
        ));
    }
    Ok(Source {
        url,
        location,
        path,
        checksums,
    })
}

/// One line of `sources.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Fetched {
    url: String,
    path: String,
    bytes: u64,
    sha256: String,
    blake3: String,
}

impl StageKind for DownloadKind {
    fn name(&self) -> &'static str {
        "download"
    }

    fn implementation(&self) -> Implementation {
        crate::implementations::DOWNLOAD
    }

    fn summary(&self) -> &'static str {
        "fetches https/http/file sources with resume, retries and checksums"
    }

    fn params(&self) -> &[ParamSpec] {
        PARAMS
    }

    fn check(&self, params: &Map<String, Value>) -> Result<(), String> {
        DownloadConfig::from_params(params)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let config = DownloadConfig::from_params(ctx.params)?;
        let agent = agent(config.timeout);
        let mut fetched = Vec::new();
        let mut resumed = 0u32;
        for source in &config.sources {
            let target = ctx.out_dir.join(&source.path);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(|e| DataError::Write {
                    path: parent.to_path_buf(),
                    source: e,
                })?;
            }
            match &source.location {
                Location::Http(url) => {
                    let part = fetch_http(ctx, &agent, &config, source, url)?;
                    resumed += u32::from(part.resumed);
                    let sums = verify(&part.path, source)?;
                    move_into(&part.path, &target)?;
                    let _ = fs::remove_file(meta_path(&part.path));
                    fetched.push(record(source, sums));
                }
                Location::File(path) => {
                    let path = ctx.work_dir.join(path);
                    copy_local(ctx, &path, &target, source)?;
                    match verify(&target, source) {
                        Ok(sums) => fetched.push(record(source, sums)),
                        Err(e) => {
                            let _ = fs::remove_file(&target);
                            return Err(e.into());
                        }
                    }
                }
            }
        }
        write_json(&ctx.out_dir.join(SOURCES_FILE), &fetched)?;
        Ok(json!({
            "files": fetched.len(),
            "bytes": fetched.iter().map(|f| f.bytes).sum::<u64>(),
            "resumed": resumed,
        }))
    }
}

fn record(source: &Source, sums: Sums) -> Fetched {
    Fetched {
        url: source.url.clone(),
        path: source.path.clone(),
        bytes: sums.bytes,
        sha256: sums.sha256,
        blake3: sums.blake3,
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_resolve(Some(timeout))
        .timeout_connect(Some(timeout))
        .timeout_recv_response(Some(timeout))
        .timeout_per_read(Some(timeout))
        .user_agent(concat!("autoscale/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

struct Sums {
    bytes: u64,
    sha256: String,
    blake3: String,
}

/// Both digests of the file, and whether the declared ones match.
fn verify(path: &Path, source: &Source) -> Result<Sums, DataError> {
    let read_err = |e| DataError::Read {
        path: path.to_path_buf(),
        source: e,
    };
    let mut file = BufReader::with_capacity(1 << 20, fs::File::open(path).map_err(read_err)?);
    let mut sha = Sha256::new();
    let mut b3 = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        b3.update(&buf[..n]);
        bytes += n as u64;
    }
    let sums = Sums {
        bytes,
        sha256: format!("{:x}", sha.finalize()),
        blake3: b3.finalize().to_hex().to_string(),
    };
    for (algo, expected) in &source.checksums {
        let actual = match algo {
            Algo::Sha256 => &sums.sha256,
            Algo::Blake3 => &sums.blake3,
        };
        if actual != expected {
            let _ = fs::remove_file(path);
            let _ = fs::remove_file(meta_path(path));
            return Err(DataError::Checksum {
                url: source.url.clone(),
                algo: algo.name(),
                expected: expected.clone(),
                actual: actual.clone(),
            });
        }
    }
    Ok(sums)
}

/// Renames, or copies when the scratch space is on another file system.
fn move_into(from: &Path, to: &Path) -> Result<(), DataError> {
    if fs::rename(from, to).is_ok() {
        return Ok(());
    }
    fs::copy(from, to).map_err(|e| DataError::Write {
        path: to.to_path_buf(),
        source: e,
    })?;
    let _ = fs::remove_file(from);
    Ok(())
}

/// Copies with progress and cancellation.
fn copy_local(
    ctx: &StageContext<'_>,
    from: &Path,
    to: &Path,
    source: &Source,
) -> Result<(), DataError> {
    let read_err = |e| DataError::Read {
        path: from.to_path_buf(),
        source: e,
    };
    let file = fs::File::open(from).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if meta.is_dir() {
        return Err(DataError::Read {
            path: from.to_path_buf(),
            source: io::Error::other("is a directory; list its files as sources"),
        });
    }
    let mut out = fs::File::create(to).map_err(|e| DataError::Write {
        path: to.to_path_buf(),
        source: e,
    })?;
    stream(ctx, file, &mut out, to, &source.path, 0, Some(meta.len()))?.map_err(read_err)?;
    out.sync_data().map_err(|e| DataError::Write {
        path: to.to_path_buf(),
        source: e,
    })
}

/// Copies `from` into `out` until the end, reporting progress; an `Err` from reading is
/// returned as is (the caller decides whether it is worth a retry).
fn stream(
    ctx: &StageContext<'_>,
    mut from: impl Read,
    out: &mut fs::File,
    out_path: &Path,
    name: &str,
    mut done: u64,
    total: Option<u64>,
) -> Result<Result<u64, io::Error>, DataError> {
    let mut buf = vec![0u8; 1 << 16];
    let mut last = Instant::now();
    loop {
        if ctx.cancelled() {
            return Err(DataError::Cancelled);
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Ok(Err(e)),
        };
        out.write_all(&buf[..n]).map_err(|e| DataError::Write {
            path: out_path.to_path_buf(),
            source: e,
        })?;
        done += n as u64;
        if last.elapsed() > Duration::from_millis(500) {
            (ctx.progress)(json!({"download": name, "bytes": done, "total": total}));
            last = Instant::now();
        }
    }
    (ctx.progress)(json!({"download": name, "bytes": done, "total": total}));
    Ok(Ok(done))
}

/// What the partial file is a part of, so a resume never mixes two versions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PartMeta {
    url: String,
    /// `ETag`, else `Last-Modified`: sent as `If-Range`.
    validator: Option<String>,
}

fn meta_path(part: &Path) -> PathBuf {
    let mut name = part.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

struct Part {
    path: PathBuf,
    resumed: bool,
}

/// How one attempt went wrong.
enum Failure {
    /// Worth another try; `reached` says whether a server answered.
    Transient {
        reason: String,
        reached: bool,
    },
    Fatal(String),
}

fn fetch_http(
    ctx: &StageContext<'_>,
    agent: &ureq::Agent,
    config: &DownloadConfig,
    source: &Source,
    url: &str,
) -> Result<Part, DataError> {
    fs::create_dir_all(&ctx.scratch_dir).map_err(|e| DataError::Write {
        path: ctx.scratch_dir.clone(),
        source: e,
    })?;
    let id = blake3::hash(url.as_bytes()).to_hex();
    let part = ctx.scratch_dir.join(format!("download-{}.part", &id[..16]));
    let meta_file = meta_path(&part);
    let mut resumed = false;
    let mut reached_any = false;
    let attempts = config.retries + 1;
    let mut last_reason = String::new();
    for attempt in 1..=attempts {
        if attempt > 1 {
            let wait = config
                .backoff
                .saturating_mul(1 << (attempt - 2).min(16))
                .min(Duration::from_secs(60));
            (ctx.progress)(
                json!({"download": source.path, "retry": attempt - 1, "after_s": wait.as_secs_f64(), "reason": last_reason}),
            );
            sleep(ctx, wait)?;
        }
        let meta: PartMeta = fs::read(&meta_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let have = match fs::metadata(&part) {
            Ok(m) if meta.url == url => m.len(),
            _ => 0,
        };
        match attempt_http(ctx, agent, source, url, &part, &meta_file, have, &meta) {
            Ok(from_offset) => {
                resumed |= from_offset > 0;
                return Ok(Part {
                    path: part,
                    resumed,
                });
            }
            Err(AttemptError::Data(e)) => return Err(e),
            Err(AttemptError::Failure(Failure::Fatal(reason))) => {
                return Err(DataError::Download {
                    url: url.to_string(),
                    reason,
                    attempts: attempt,
                    offline: false,
                });
            }
            Err(AttemptError::Failure(Failure::Transient { reason, reached })) => {
                reached_any |= reached;
                last_reason = reason;
            }
        }
    }
    Err(DataError::Download {
        url: url.to_string(),
        reason: last_reason,
        attempts,
        offline: !reached_any,
    })
}

enum AttemptError {
    Data(DataError),
    Failure(Failure),
}

impl From<DataError> for AttemptError {
    fn from(e: DataError) -> Self {
        AttemptError::Data(e)
    }
}

/// One request; the offset it resumed from.
#[allow(clippy::too_many_arguments)]
fn attempt_http(
    ctx: &StageContext<'_>,
    agent: &ureq::Agent,
    source: &Source,
    url: &str,
    part: &Path,
    meta_file: &Path,
    have: u64,
    meta: &PartMeta,
) -> Result<u64, AttemptError> {
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
        if let Some(v) = &meta.validator {
            request = request.header("If-Range", v);
        }
    }
    let response = request
        .call()
        .map_err(|e| AttemptError::Failure(classify(&e)))?;
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_length = header("content-length").and_then(|v| v.parse::<u64>().ok());
    let validator = header("etag").or_else(|| header("last-modified"));
    let write_err = |e| {
        AttemptError::Data(DataError::Write {
            path: part.to_path_buf(),
            source: e,
        })
    };
    let (offset, total) = match status {
        206 if have > 0 => {
            // `bytes START-END/TOTAL`: the range must start where the part ends.
            let range = header("content-range").unwrap_or_default();
            let start = range
                .strip_prefix("bytes ")
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.trim().parse::<u64>().ok());
            if start != Some(have) {
                let _ = fs::remove_file(part);
                return Err(AttemptError::Failure(Failure::Transient {
                    reason: format!("the server resumed at the wrong offset (`{range}`)"),
                    reached: true,
                }));
            }
            (have, content_length.map(|n| n + have))
        }
        200 => (0, content_length),
        416 => {
            // The part is as long as the file or longer; start over.
            let _ = fs::remove_file(part);
            return Err(AttemptError::Failure(Failure::Transient {
                reason: "the server refused the resume range (416); starting over".into(),
                reached: true,
            }));
        }
        408 | 425 | 429 | 500..=599 => {
            return Err(AttemptError::Failure(Failure::Transient {
                reason: format!("the server answered {status}"),
                reached: true,
            }));
        }
        _ => {
            return Err(AttemptError::Failure(Failure::Fatal(format!(
                "the server answered {status}{}",
                match status {
                    401 | 403 => " (not allowed: does the URL need credentials?)",
                    404 | 410 => " (not found: check the URL)",
                    _ => "",
                }
            ))));
        }
    };
    let next_meta = PartMeta {
        url: url.to_string(),
        validator,
    };
    let mut file = if offset == 0 {
        fs::File::create(part).map_err(write_err)?
    } else {
        fs::OpenOptions::new()
            .append(true)
            .open(part)
            .map_err(write_err)?
    };
    let meta_bytes = serde_json::to_vec(&next_meta).unwrap_or_default();
    fs::write(meta_file, meta_bytes).map_err(write_err)?;
    let body = response.into_body().into_reader();
    let result = stream(ctx, body, &mut file, part, &source.path, offset, total)?;
    file.sync_data().map_err(write_err)?;
    match result {
        Ok(done) if total.is_none_or(|t| t == done) => Ok(offset),
        Ok(done) => Err(AttemptError::Failure(Failure::Transient {
            reason: format!(
                "the body ended after {done} of {} bytes",
                total.unwrap_or(0)
            ),
            reached: true,
        })),
        Err(e) => Err(AttemptError::Failure(Failure::Transient {
            reason: format!("the connection broke after {} bytes: {e}", part_len(part)),
            reached: true,
        })),
    }
}

fn part_len(part: &Path) -> u64 {
    fs::metadata(part).map(|m| m.len()).unwrap_or(0)
}

/// Whether an error is worth a retry, and whether a server was reached at all.
fn classify(e: &ureq::Error) -> Failure {
    use ureq::Error as E;
    let unreachable = |reason: String| Failure::Transient {
        reason,
        reached: false,
    };
    match e {
        E::HostNotFound => unreachable("cannot resolve the host name".into()),
        E::ConnectionFailed => unreachable("cannot connect".into()),
        E::Timeout(t) => {
            let phase = t.to_string();
            Failure::Transient {
                reason: format!("timed out ({phase})"),
                reached: !(phase.contains("resolve") || phase.contains("connect")),
            }
        }
        E::Io(io) => match io.kind() {
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::NetworkDown
            | io::ErrorKind::NotFound => unreachable(format!("cannot connect: {io}")),
            _ if io.to_string().contains("lookup") => {
                unreachable(format!("cannot resolve the host name: {io}"))
            }
            _ => Failure::Transient {
                reason: io.to_string(),
                reached: true,
            },
        },
        E::BadUri(u) => Failure::Fatal(format!("bad URL: {u}")),
        E::TooManyRedirects | E::RedirectFailed => Failure::Fatal(e.to_string()),
        E::Tls(_) | E::Rustls(_) | E::Pem(_) => Failure::Fatal(format!("TLS: {e}")),
        other => Failure::Transient {
            reason: other.to_string(),
            reached: true,
        },
    }
}

fn sleep(ctx: &StageContext<'_>, wait: Duration) -> Result<(), DataError> {
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if ctx.cancelled() {
            return Err(DataError::Cancelled);
        }
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::data::test_support::{Harness, params};

    /// What the test server does with each request, in order; the last repeats.
    #[derive(Clone, Copy, Debug)]
    enum Reply {
        /// Serve the file, honouring `Range`.
        Serve,
        /// Serve the whole file whatever the request, as a server without range support does.
        Whole,
        /// Announce the whole length but hang up after this many bytes.
        CutAt(usize),
        Status(u16),
    }

    struct Server {
        url: String,
        requests: Arc<Mutex<Vec<String>>>,
        count: Arc<AtomicUsize>,
    }

    /// A one-file HTTP/1.1 server on 127.0.0.1, in a thread, for as long as the test runs.
    fn server(body: Vec<u8>, replies: Vec<Reply>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!(
            "http://{}/data/file.bin",
            listener.local_addr().expect("addr")
        );
        let requests = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let (reqs, n) = (requests.clone(), count.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let i = n.fetch_add(1, Ordering::SeqCst);
                let reply = replies[i.min(replies.len() - 1)];
                let _ = handle(stream, &body, reply, &reqs);
            }
        });
        Server {
            url,
            requests,
            count,
        }
    }

    fn handle(
        mut stream: TcpStream,
        body: &[u8],
        reply: Reply,
        requests: &Mutex<Vec<String>>,
    ) -> io::Result<()> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte)? == 0 {
                return Ok(());
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        requests.lock().expect("lock").push(head.clone());
        let range = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("range: bytes=")
                    .map(str::to_string)
            })
            .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
        match reply {
            Reply::Status(code) => write!(
                stream,
                "HTTP/1.1 {code} Nope\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            ),
            Reply::CutAt(n) => {
                write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\netag: \"v1\"\r\nconnection: close\r\n\r\n",
                    body.len()
                )?;
                stream.write_all(&body[..n])?;
                stream.flush()
            }
            Reply::Whole => {
                write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                )?;
                stream.write_all(body)
            }
            Reply::Serve => match range {
                Some(start) if start < body.len() => {
                    write!(
                        stream,
                        "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{}/{}\r\netag: \"v1\"\r\nconnection: close\r\n\r\n",
                        body.len() - start,
                        body.len() - 1,
                        body.len()
                    )?;
                    stream.write_all(&body[start..])
                }
                _ => {
                    write!(
                        stream,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\netag: \"v1\"\r\nconnection: close\r\n\r\n",
                        body.len()
                    )?;
                    stream.write_all(body)
                }
            },
        }
    }

    fn body() -> Vec<u8> {
        (0..300_000u32).map(|i| (i % 251) as u8).collect()
    }

    fn sha256(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    #[test]
    fn a_cut_off_body_is_resumed_with_a_range_request() {
        let body = body();
        let srv = server(body.clone(), vec![Reply::CutAt(100_000), Reply::Serve]);
        let h = Harness::new();
        let p = params(json!({
            "sources": [{"url": srv.url, "path": "raw/file.bin", "sha256": sha256(&body)}],
            "backoff_s": 0.01,
        }));
        let out = h.run_one(&DownloadKind, &p, &[]);
        assert_eq!(fs::read(out.join("raw/file.bin")).expect("file"), body);
        let requests = srv.requests.lock().expect("lock").clone();
        assert_eq!(requests.len(), 2);
        let second = requests[1].to_ascii_lowercase();
        assert!(second.contains("range: bytes=100000-"), "{second}");
        assert!(second.contains("if-range: \"v1\""), "{second}");
        let listed: Vec<Fetched> = serde_json::from_str(
            &fs::read_to_string(out.join(SOURCES_FILE)).expect("sources.json"),
        )
        .expect("json");
        assert_eq!(listed[0].bytes, body.len() as u64);
        assert_eq!(listed[0].blake3, blake3::hash(&body).to_hex().to_string());
        assert!(
            h.events
                .lock()
                .expect("lock")
                .iter()
                .any(|e| e["retry"] == 1),
            "the retry is reported"
        );
    }

    #[test]
    fn a_server_that_ignores_the_range_is_read_from_the_start() {
        let body = body();
        let srv = server(body.clone(), vec![Reply::CutAt(70_000), Reply::Whole]);
        let h = Harness::new();
        let p = params(
            json!({"sources": [{"url": srv.url, "sha256": sha256(&body)}], "backoff_s": 0.0}),
        );
        let out = h.run_one(&DownloadKind, &p, &[]);
        assert_eq!(fs::read(out.join("file.bin")).expect("file"), body);
        assert!(srv.requests.lock().expect("lock")[1].contains("bytes=70000-"));
    }

    #[test]
    fn a_killed_run_leaves_a_partial_file_the_next_run_resumes() {
        let body = body();
        let srv = server(body.clone(), vec![Reply::Serve]);
        let h = Harness::new();
        // What a killed run leaves in scratch: the first 50,000 bytes and their validator.
        let id = blake3::hash(srv.url.as_bytes()).to_hex();
        fs::create_dir_all(h.scratch()).expect("scratch");
        let part = h.scratch().join(format!("download-{}.part", &id[..16]));
        fs::write(&part, &body[..50_000]).expect("part");
        fs::write(
            meta_path(&part),
            serde_json::to_vec(&PartMeta {
                url: srv.url.clone(),
                validator: Some("\"v1\"".into()),
            })
            .expect("json"),
        )
        .expect("meta");
        let p = params(json!({"sources": [srv.url], "backoff_s": 0.0}));
        let (out, meta) = h
            .run_inputs(&DownloadKind, &p, Default::default(), "download")
            .expect("download");
        assert_eq!(fs::read(out.join("file.bin")).expect("file"), body);
        assert_eq!(meta["resumed"], 1);
        assert!(srv.requests.lock().expect("lock")[0].contains("bytes=50000-"));
        assert!(!part.exists(), "the part moved into the output");
    }

    #[test]
    fn a_checksum_mismatch_is_refused_and_nothing_is_kept() {
        let body = body();
        let srv = server(body, vec![Reply::Serve]);
        let h = Harness::new();
        let p = params(json!({"sources": [{"url": srv.url, "blake3": "0".repeat(64)}]}));
        let err = h.run(&DownloadKind, &p, &[]).expect_err("mismatch");
        let StageError::Failed { message, hint } = err else {
            panic!("a failure");
        };
        assert!(
            message.contains("does not match its declared blake3"),
            "{message}"
        );
        assert!(hint.expect("hint").contains("nothing was kept"));
        let leftovers: Vec<_> = fs::read_dir(h.scratch()).expect("scratch").collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn server_errors_are_retried_and_a_404_is_not() {
        let body = body();
        let srv = server(
            body.clone(),
            vec![Reply::Status(503), Reply::Status(503), Reply::Serve],
        );
        let h = Harness::new();
        let p = params(json!({"sources": [srv.url], "backoff_s": 0.01, "retries": 2}));
        let out = h.run_one(&DownloadKind, &p, &[]);
        assert_eq!(
            fs::read(out.join("file.bin")).expect("file").len(),
            body.len()
        );
        assert_eq!(srv.count.load(Ordering::SeqCst), 3);

        let srv = server(body, vec![Reply::Status(404)]);
        let p = params(json!({"sources": [srv.url], "backoff_s": 0.01, "retries": 3}));
        let err = Harness::new().run(&DownloadKind, &p, &[]).expect_err("404");
        assert!(err.to_string().contains("answered 404 (not found"), "{err}");
        assert!(err.to_string().contains("(1 attempt(s))"), "{err}");
        assert_eq!(srv.count.load(Ordering::SeqCst), 1, "a 404 is not retried");
    }

    #[test]
    fn no_server_at_all_reads_as_offline() {
        // A port that was just free: nothing listens there.
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let p = params(json!({
            "sources": [format!("http://127.0.0.1:{port}/x.jsonl")],
            "retries": 1, "backoff_s": 0.01, "timeout_s": 2,
        }));
        let err = Harness::new()
            .run(&DownloadKind, &p, &[])
            .expect_err("offline");
        let StageError::Failed { message, hint } = err else {
            panic!("a failure");
        };
        assert!(message.contains("(2 attempt(s))"), "{message}");
        assert!(hint.expect("hint").contains("offline"), "{message}");
    }

    #[test]
    fn local_paths_and_file_urls_are_copied_and_checked() {
        let h = Harness::new();
        let src = h.dir.path().join("corpus/books.jsonl");
        fs::create_dir_all(src.parent().expect("parent")).expect("mkdir");
        fs::write(&src, "{\"text\": \"x\"}\n").expect("write");
        let sum = sha256(b"{\"text\": \"x\"}\n");
        let p = params(json!({"sources": [
            {"url": "corpus/books.jsonl", "sha256": sum},
            {"url": format!("file://{}", src.display()), "path": "again/books.jsonl"},
        ]}));
        let out = h.run_one(&DownloadKind, &p, &[]);
        assert!(out.join("books.jsonl").is_file());
        assert!(out.join("again/books.jsonl").is_file());
        let bad =
            params(json!({"sources": [{"url": "corpus/books.jsonl", "sha256": "a".repeat(64)}]}));
        let err = h.run(&DownloadKind, &bad, &[]).expect_err("mismatch");
        assert!(err.to_string().contains("declared sha256"), "{err}");
    }

    #[test]
    fn bad_source_lists_are_refused_before_running() {
        for (sources, needle) in [
            (json!([]), "at least one source"),
            (json!(["s3://bucket/a.jsonl"]), "unsupported scheme `s3://`"),
            (
                json!([{"url": "a.jsonl", "sha256": "xyz"}]),
                "64 hex digits",
            ),
            (json!([{"url": "a.jsonl", "path": "../a"}]), "without `..`"),
            (
                json!(["x/a.jsonl", "y/a.jsonl"]),
                "two sources land at `a.jsonl`",
            ),
            (json!([{"url": "a", "md5": "x"}]), "unknown field `md5`"),
            (json!(["https://host/dir/"]), "give it a `path`"),
        ] {
            let err = DownloadKind
                .check(&params(json!({"sources": sources})))
                .expect_err("refused");
            assert!(err.contains(needle), "{err}");
        }
    }
}
