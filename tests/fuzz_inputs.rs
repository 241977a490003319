//! Fuzzing the decoders of untrusted or hand-edited input with `proptest` (stable Rust, no
//! cargo-fuzz): every input must give a value or an error, never a panic, a hang or a crash.
//!
//! | target | entry points | seeds |
//! |---|---|---|
//! | `pipeline` | `Pipeline::load` (with `--set` overrides and an overlay file), `select`, `dependencies`, `expand_fanout`; a sample of the inputs also through `autoscale status` in a child process (time- and memory-limited) | `pipelines/*.yaml`, `tests/fuzz/corpus/pipeline/` |
//! | `manifest` | a local manifest (and now and then a damaged blob) read by `Cache::lookup_local`, `find`, `materialize`, `list`, `verify`; a sample also through `autoscale cache verify` and `cache ls` | manifests of a cache built at start, `tests/fuzz/corpus/manifest/` |
//! | `remote` | a directory remote's action entry (the envelope around a manifest) and its blobs, read through `Cache::find`, `lookup` and `pull` | entries pushed at start, `tests/fuzz/corpus/remote/` |
//!
//! Inputs are byte-level mutations of the seeds (bit flips, byte sets, inserts, deletes,
//! duplicated ranges, splices of two seeds, format tokens) and structured generation
//! (pipelines with random stages, references, params, fan-outs, anchors and merges; manifests
//! and entries with random paths, digests, sizes and keys, half of them with a correct tree
//! digest so that the deeper checks are reached).
//!
//! Each target runs until `AUTOSCALE_FUZZ_SECS` (default 60) is spent; each input has its own
//! time limit (a hang is a failure). `AUTOSCALE_FUZZ_SEED` fixes the seed (printed either way).
//! A failing input is saved under the test target's temp folder (the path is printed).
//!
//! ```sh
//! AUTOSCALE_FUZZ_SECS=60 cargo test --locked --test fuzz_inputs -- --nocapture --test-threads 1
//! ```
#![cfg(target_os = "linux")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::fs;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use autoscale_cache::remote::{RemoteLimits, RemoteLocation};
use autoscale_cache::{ActionKey, ArtifactDigest, Cache, Remote, RemoteMode, tree_digest};
use autoscale_engine::{FanoutChild, InputRef, KindRegistry, Overrides, Pipeline};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Value, json};

// ------------------------------------------------------------------------------------------
// The driver

/// How long each target runs.
fn budget() -> Duration {
    let secs = std::env::var("AUTOSCALE_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(60.0);
    Duration::from_secs_f64(secs.max(0.0))
}

fn seed() -> u64 {
    std::env::var("AUTOSCALE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64)
        })
}

/// Longest any one input may take (a child `autoscale` gets [`CHILD_LIMIT`] of it).
const INPUT_LIMIT: Duration = Duration::from_secs(30);
const CHILD_LIMIT: Duration = Duration::from_secs(10);
/// The address-space limit of a child `autoscale`: a small input that asks for more is a bug.
const CHILD_MEMORY: &str = "4294967296";

/// What an input is, as bytes to save when it fails.
trait FuzzInput: Debug + Clone + Send + 'static {
    fn artifact(&self) -> Vec<u8>;
}

/// What one input did: tags to count (which paths it reached), or a broken property.
type Verdict = Result<Vec<&'static str>, String>;

#[derive(Default)]
struct Report {
    executions: usize,
    panics: usize,
    hangs: usize,
    violations: usize,
    tags: BTreeMap<&'static str, usize>,
    saved: Vec<PathBuf>,
    /// Distinct failures (digits and paths blurred) and how often each came.
    kinds: BTreeMap<String, usize>,
}

/// A failure message with what varies between inputs blurred, to count distinct failures.
fn failure_kind(message: &str) -> String {
    let mut out = String::new();
    let mut in_path = false;
    for c in message.chars() {
        if out.len() >= 160 {
            break;
        }
        match c {
            '`' => {
                in_path = !in_path;
                out.push('`');
            }
            _ if in_path => {}
            '0'..='9' => {
                if !out.ends_with('N') {
                    out.push('N');
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// Runs `property` on inputs drawn from `strategy` until the budget is spent, in a worker
/// thread that owns the state `make` builds, each input guarded by [`INPUT_LIMIT`].
fn fuzz<S, C>(
    name: &'static str,
    strategy: S,
    make: impl FnOnce() -> C + Send + 'static,
    property: fn(&mut C, &S::Value) -> Verdict,
) -> Report
where
    S: Strategy,
    S::Value: FuzzInput,
    C: 'static,
{
    let seed = seed();
    let budget = budget();
    eprintln!(
        "fuzz {name}: seed {seed} (AUTOSCALE_FUZZ_SEED={seed}), budget {:.0} s",
        budget.as_secs_f64()
    );
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&(name.len() as u64).to_le_bytes());
    bytes[16..16 + name.len().min(16)].copy_from_slice(&name.as_bytes()[..name.len().min(16)]);
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let (job_tx, job_rx) = mpsc::channel::<S::Value>();
    let (done_tx, done_rx) = mpsc::channel::<Result<Verdict, String>>();
    let worker = std::thread::Builder::new()
        .name(format!("fuzz-{name}"))
        .stack_size(64 << 20)
        .spawn(move || {
            let mut state = make();
            for input in job_rx {
                let result =
                    std::panic::catch_unwind(AssertUnwindSafe(|| property(&mut state, &input)))
                        .map_err(|p| {
                            p.downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "a panic without a message".into())
                        });
                if done_tx.send(result).is_err() {
                    break;
                }
            }
        })
        .expect("spawn the worker");
    let saved_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-failures")
        .join(name);
    let mut report = Report::default();
    let start = Instant::now();
    let mut hung = false;
    while start.elapsed() < budget {
        let input = strategy
            .new_tree(&mut runner)
            .expect("generate an input")
            .current();
        job_tx.send(input.clone()).expect("the worker is alive");
        report.executions += 1;
        let problem = match done_rx.recv_timeout(INPUT_LIMIT) {
            Ok(Ok(Ok(tags))) => {
                for t in tags {
                    *report.tags.entry(t).or_default() += 1;
                }
                None
            }
            Ok(Ok(Err(violation))) => {
                report.violations += 1;
                Some(format!("property violated: {violation}"))
            }
            Ok(Err(panic)) => {
                report.panics += 1;
                Some(format!("panic: {panic}"))
            }
            Err(_) => {
                report.hangs += 1;
                hung = true;
                Some(format!("no answer within {INPUT_LIMIT:?}"))
            }
        };
        if let Some(problem) = problem {
            let seen = report.kinds.entry(failure_kind(&problem)).or_default();
            *seen += 1;
            // The first few inputs of each kind are printed and saved; the rest only counted.
            if *seen <= 3 {
                fs::create_dir_all(&saved_dir).expect("mkdir");
                let path = saved_dir.join(format!("{seed}-{}.bin", report.executions));
                fs::write(&path, input.artifact()).expect("save the input");
                eprintln!(
                    "fuzz {name}: FAILURE at execution {}: {problem}\n  input saved to {}\n  input: {:.2000}",
                    report.executions,
                    path.display(),
                    format!("{input:?}")
                );
                report.saved.push(path);
            }
        }
        if hung {
            // The worker is stuck on that input; it cannot be stopped, only left behind.
            eprintln!("fuzz {name}: stopping: the worker hangs");
            break;
        }
    }
    drop(job_tx);
    if !hung {
        let _ = worker.join();
    }
    eprintln!(
        "fuzz {name}: {} executions in {:.1} s, {} panics, {} hangs, {} property violations; reached: {:?}",
        report.executions,
        start.elapsed().as_secs_f64(),
        report.panics,
        report.hangs,
        report.violations,
        report.tags
    );
    for (kind, n) in &report.kinds {
        eprintln!("fuzz {name}: {n} x {kind}");
    }
    report
}

fn assert_clean(name: &str, report: &Report) {
    assert!(
        report.panics + report.hangs + report.violations == 0,
        "fuzz {name}: {} panics, {} hangs, {} property violations; inputs saved: {:?}",
        report.panics,
        report.hangs,
        report.violations,
        report.saved
    );
}

// ------------------------------------------------------------------------------------------
// Byte-level mutations

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Duplicate(usize, usize, usize),
    /// From another seed: (seed, start, length, at).
    Splice(usize, usize, usize, usize),
    Token(usize, usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::Flip(p, b)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        2 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(p, b)| Mutation::Insert(p, b)),
        2 => (any::<usize>(), 1usize..48).prop_map(|(p, n)| Mutation::Delete(p, n)),
        2 => (any::<usize>(), 1usize..48, any::<usize>())
            .prop_map(|(p, n, at)| Mutation::Duplicate(p, n, at)),
        2 => (any::<usize>(), any::<usize>(), 1usize..200, any::<usize>())
            .prop_map(|(s, p, n, at)| Mutation::Splice(s, p, n, at)),
        5 => (any::<usize>(), any::<usize>()).prop_map(|(p, t)| Mutation::Token(p, t)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..8)
}

/// Applies the mutations to `seed`; `pool` feeds splices, `tokens` token inserts.
fn mutate(seed: &[u8], muts: &[Mutation], pool: &[Vec<u8>], tokens: &[&str]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in muts {
        let at = |p: usize, b: &Vec<u8>| p % (b.len() + 1);
        match m {
            Mutation::Flip(p, bit) if !b.is_empty() => {
                let i = p % b.len();
                b[i] ^= 1 << bit;
            }
            Mutation::Set(p, v) if !b.is_empty() => {
                let i = p % b.len();
                b[i] = *v;
            }
            Mutation::Insert(p, bytes) => {
                let i = at(*p, &b);
                b.splice(i..i, bytes.iter().copied());
            }
            Mutation::Delete(p, n) if !b.is_empty() => {
                let i = p % b.len();
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            Mutation::Duplicate(p, n, to) if !b.is_empty() => {
                let i = p % b.len();
                let chunk: Vec<u8> = b[i..(i + n).min(b.len())].to_vec();
                let j = at(*to, &b);
                b.splice(j..j, chunk);
            }
            Mutation::Splice(s, p, n, to) if !pool.is_empty() => {
                let other = &pool[s % pool.len()];
                if !other.is_empty() {
                    let i = p % other.len();
                    let chunk = &other[i..(i + n).min(other.len())];
                    let j = at(*to, &b);
                    b.splice(j..j, chunk.iter().copied());
                }
            }
            Mutation::Token(p, t) if !tokens.is_empty() => {
                let j = at(*p, &b);
                let tok = tokens[t % tokens.len()].as_bytes();
                b.splice(j..j, tok.iter().copied());
            }
            Mutation::Truncate(p) => {
                let j = at(*p, &b);
                b.truncate(j);
            }
            _ => {}
        }
        if b.len() > 1 << 20 {
            b.truncate(1 << 20);
        }
    }
    b
}

fn read_dir_files(dir: &Path, ext: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| ext.contains(&e))
                })
                .filter_map(|p| {
                    let name = p.file_name()?.to_string_lossy().into_owned();
                    Some((name, fs::read(&p).ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A scratch folder, on tmpfs where there is one: inputs create and delete thousands of
/// small trees, which ext4 makes slow (its inode allocator scans recently deleted inodes).
fn sandbox() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().expect("tempdir")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether util-linux's `prlimit` is there to cap a child's memory. Without it no child runs:
/// an input that makes `autoscale` allocate without bound must not take the machine down.
fn can_limit_children() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| {
        let ok = Command::new("prlimit")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("fuzz: no `prlimit`: inputs are not run through a child `autoscale`");
        }
        ok
    })
}

/// Runs `autoscale ARGS` in `dir` with the cache at `cache`, under a memory limit and a time
/// limit; `Err` names what went wrong when it crashed, panicked or hung.
fn run_child(dir: &Path, cache: &Path, args: &[&str]) -> Result<i32, String> {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--as={CHILD_MEMORY}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_autoscale"))
        .args(args)
        .current_dir(dir)
        .env("AUTOSCALE_CACHE_DIR", cache)
        .env_remove("AUTOSCALE_REMOTE")
        .env_remove("AUTOSCALE_TRAINER")
        .env("CUDA_VISIBLE_DEVICES", "")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > CHILD_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "`autoscale {}` did not finish within {CHILD_LIMIT:?}",
                args.join(" ")
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let text = reader.join().unwrap_or_default();
    match status.code() {
        Some(code @ (0..=2 | 130)) if !text.contains("panicked") => Ok(code),
        Some(code) => Err(format!(
            "`autoscale {}` exited {code}: {}",
            args.join(" "),
            tail(&text)
        )),
        None => Err(format!(
            "`autoscale {}` was killed by a signal ({status:?}): {}",
            args.join(" "),
            tail(&text)
        )),
    }
}

fn tail(text: &str) -> &str {
    let cut = text.len().saturating_sub(1500);
    let mut i = cut;
    while !text.is_char_boundary(i) {
        i += 1;
    }
    &text[i..]
}

// ------------------------------------------------------------------------------------------
// Target (a): pipelines

const YAML_TOKENS: &[&str] = &[
    "\n",
    "\n  ",
    "\n    ",
    "\n  - ",
    "- ",
    ": ",
    ":",
    "{",
    "}",
    "[",
    "]",
    ", ",
    "'",
    "\"",
    "#",
    "&a ",
    "*a",
    "<<: *a",
    "<<: ",
    "!!str ",
    "!!binary ",
    "!custom ",
    "? ",
    "|\n  ",
    ">-\n  ",
    "---\n",
    "...\n",
    "%YAML 1.2\n",
    "~",
    "null",
    "true",
    "no",
    "1e400",
    "-1",
    "0x1F",
    "0o17",
    ".nan",
    "-.inf",
    "4294967296",
    "18446744073709551616",
    "99999999999999999999999",
    "${params.",
    "${params.lr}",
    "${matrix.",
    "${matrix.a}",
    "${item}",
    "${",
    "}",
    "${out}",
    "${inputs.x}",
    "file:",
    "file:../../",
    "/",
    "[0]",
    "[a,b]",
    "stages:",
    "id: ",
    "kind: ",
    "command",
    "params:",
    "inputs:",
    "matrix:",
    "foreach:",
    "fanout:",
    "retries:",
    "resources:",
    "gpus: ",
    "memory: ",
    "8GiB",
    "-1GiB",
    "env:",
    "root:",
    "name:",
    "templates:",
    "cmd: ",
    "outputs:",
    "\t",
    "\u{feff}",
    "\u{0}",
    "é",
    "\u{202e}",
    "\r\n",
    "\\",
    "\\u0000",
];

const IDS: &[&str] = &[
    "a",
    "b",
    "c",
    "prep",
    "train",
    "eval",
    "shard",
    "plan",
    "ddo",
    "x-y",
    "a.b",
    "a_b",
    "A",
    "0",
    "",
    "a b",
    "a/b",
    "a[0]",
    "é",
    "train[0.0001,0]",
];

const INPUT_NAMES: &[&str] = &["data", "x", "model", "runs", "", "a-b", "A", "data.x"];

const SCALARS: &[&str] = &[
    "1",
    "0",
    "-1",
    "3.0e-4",
    "1e309",
    "true",
    "false",
    "null",
    "~",
    "\"\"",
    "\"hello\"",
    "text",
    "[]",
    "{}",
    "[1, 2]",
    "{a: 1}",
    "\"${params.p}\"",
    "\"${params.lr}\"",
    "\"${params.nope}\"",
    "\"${matrix.a}\"",
    "\"${item}\"",
    "\"x${params.p}y\"",
    "\"${\"",
    "\"$${params.p}\"",
    "4294967295",
    "9223372036854775807",
    "18446744073709551615",
    "-9223372036854775808",
    "\"8GiB\"",
    "\"1.5 TB\"",
    "\"-3MiB\"",
    "[books, code]",
    "{books: 0.5, code: 0.5}",
    "{type: int, default: 3}",
    "{type: float, default: 1}",
    "{type: nope, default: 1}",
    "{type: list, default: [a]}",
    "{type: map, default: {}}",
    "{default: 1, help: h}",
];

const PARAM_NAMES: &[&str] = &[
    "p",
    "lr",
    "seed",
    "note",
    "domains",
    "base_seeds",
    "base_tokens",
    "multipliers",
    "cmd",
    "outputs",
    "sources",
    "vocab_size",
    "tokens",
    "weights",
    "total_tokens",
    "model",
    "steps",
    "",
    "a-b",
    "A",
    "x.y",
];

#[derive(Debug, Clone)]
struct GenStage {
    id: usize,
    kind: usize,
    template: bool,
    params: Vec<(usize, usize)>,
    inputs: Vec<(usize, String)>,
    cmd: Option<usize>,
    outputs: Option<Vec<usize>>,
    fan: u8,
    axes: Vec<(usize, Vec<usize>)>,
    fanout: usize,
    retries: Option<usize>,
    resources: Option<(usize, usize, usize, bool)>,
    env: Vec<usize>,
}

#[derive(Debug, Clone)]
struct GenPipeline {
    name: usize,
    root: Option<usize>,
    params: Vec<(usize, usize)>,
    env: Vec<usize>,
    template: Option<(usize, Vec<(usize, usize)>)>,
    stages: Vec<GenStage>,
    flow: bool,
    /// Avoid the choices known to be invalid, so that most such pipelines load and the code
    /// past validation is reached.
    tidy: bool,
}

/// Values that are fine wherever a param goes.
const SAFE_SCALARS: &[&str] = &[
    "1",
    "0",
    "-1",
    "3.0e-4",
    "true",
    "false",
    "\"hello\"",
    "text",
    "[1, 2]",
    "{a: 1}",
    "\"${params.p}\"",
    "\"x${params.p}y\"",
    "[books, code]",
    "\"${params.lr}\"",
];
const SAFE_PARAM_NAMES: &[&str] = &["q", "note", "seed", "steps", "model", "weights"];

/// `@N` and `@N/path` stand for the stage N places earlier (rendered by position).
fn input_ref() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (1..4usize).prop_map(|n| format!("@{n}")),
        2 => (1..4usize, 0..3usize).prop_map(|(n, p)| format!("@{n}/{}", ["x.txt", "a/b", "y"][p])),
        3 => (0..IDS.len()).prop_map(|i| IDS[i].to_string()),
        2 => (0..IDS.len(), 0..4usize).prop_map(|(i, p)| {
            format!("{}/{}", IDS[i], ["data.txt", "sub/dir", "", "../x"][p])
        }),
        1 => (0..5usize).prop_map(|i| {
            ["file:data.txt", "file:missing", "file:", "file:sub", "file:./data.txt"][i].to_string()
        }),
        1 => "[ -~]{0,12}",
    ]
}

fn gen_stage() -> impl Strategy<Value = GenStage> {
    (
        (
            0..IDS.len(),
            0..12usize,
            proptest::bool::weighted(0.15),
            proptest::collection::vec((0..PARAM_NAMES.len(), 0..SCALARS.len()), 0..4),
            proptest::collection::vec((0..INPUT_NAMES.len(), input_ref()), 0..3),
            proptest::option::weighted(0.8, 0..4usize),
            proptest::option::weighted(0.3, proptest::collection::vec(0..6usize, 0..3)),
        ),
        (
            0..8u8,
            proptest::collection::vec(
                (0..4usize, proptest::collection::vec(0..SCALARS.len(), 0..4)),
                1..4,
            ),
            0..IDS.len(),
            proptest::option::weighted(0.2, 0..5usize),
            proptest::option::weighted(0.2, (0..6usize, 0..6usize, 0..6usize, any::<bool>())),
            proptest::collection::vec(0..5usize, 0..2),
        ),
    )
        .prop_map(
            |(
                (id, kind, template, params, inputs, cmd, outputs),
                (fan, axes, fanout, retries, resources, env),
            )| GenStage {
                id,
                kind,
                template,
                params,
                inputs,
                cmd,
                outputs,
                fan,
                axes,
                fanout,
                retries,
                resources,
                env,
            },
        )
}

fn gen_pipeline() -> impl Strategy<Value = GenPipeline> {
    (
        0..4usize,
        proptest::option::weighted(0.2, 0..4usize),
        proptest::collection::vec((0..PARAM_NAMES.len(), 0..SCALARS.len()), 0..4),
        proptest::collection::vec(0..5usize, 0..2),
        proptest::option::weighted(
            0.3,
            (
                0..12usize,
                proptest::collection::vec((0..PARAM_NAMES.len(), 0..SCALARS.len()), 0..3),
            ),
        ),
        proptest::collection::vec(gen_stage(), 0..7),
        proptest::bool::weighted(0.2),
        proptest::bool::weighted(0.5),
    )
        .prop_map(
            |(name, root, params, env, template, stages, flow, tidy)| GenPipeline {
                name,
                root,
                params,
                env,
                template,
                stages,
                flow,
                tidy,
            },
        )
}

/// The kinds the generator names: the real ones (by index into the registry's names), then
/// some that do not exist.
/// Half the time `command`, else another real kind, or one that does not exist.
fn kind_name(kinds: &[&'static str], i: usize) -> String {
    match i {
        0..=5 => "command".to_string(),
        6..=9 => kinds
            .get((i - 6) * kinds.len() / 4 + i % 2)
            .map_or("command".to_string(), |k| k.to_string()),
        _ => ["comand", "", "train", "eval"][i % 4].to_string(),
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string")
}

/// A tidy pipeline: the same draw with the choices known to be invalid replaced.
fn tidied(g: &GenPipeline) -> GenPipeline {
    let mut g = g.clone();
    g.name = 0;
    g.root = g.root.map(|_| 0);
    let mut seen = BTreeSet::new();
    g.params
        .retain(|(n, _)| seen.insert(*n % SAFE_PARAM_NAMES.len()));
    if let Some((kind, params)) = &mut g.template {
        *kind = 0;
        let mut seen = BTreeSet::new();
        params.retain(|(n, _)| seen.insert(*n % SAFE_PARAM_NAMES.len()));
    }
    g.env = g.env.iter().map(|e| [0, 1, 4][e % 3]).collect();
    g.env.dedup();
    for (pos, s) in g.stages.iter_mut().enumerate() {
        if pos == 0 {
            s.inputs.clear();
            if s.fan == 2 {
                s.fan = 7;
            }
        }
        s.id = 0;
        s.kind = 0;
        s.cmd = Some(s.cmd.unwrap_or(0) % 2);
        s.outputs = s
            .outputs
            .take()
            .map(|o| o.into_iter().map(|i| [0, 4, 5][i % 3]).collect());
        let mut seen = BTreeSet::new();
        s.params
            .retain(|(n, _)| seen.insert(*n % SAFE_PARAM_NAMES.len()));
        let mut seen = BTreeSet::new();
        s.inputs
            .retain(|(n, r)| r.starts_with('@') && seen.insert(*n % 4));
        s.inputs = s.inputs.iter().map(|(n, r)| (n % 4, r.clone())).collect();
        let mut seen = BTreeSet::new();
        s.axes.retain(|(a, v)| !v.is_empty() && seen.insert(*a));
        if s.axes.is_empty() {
            s.fan = 7;
        }
        s.retries = s.retries.map(|r| r % 3);
        s.resources = s.resources.map(|(c, g, m, r)| (c % 3, g % 3, m % 2, r));
        s.env = s.env.iter().map(|e| [0, 1, 4][e % 3]).collect();
        s.env.dedup();
    }
    g
}

fn render_pipeline(g: &GenPipeline, kinds: &[&'static str]) -> String {
    let tidy = g.tidy;
    let g = &if tidy { tidied(g) } else { g.clone() };
    let value = |i: usize| {
        if tidy {
            SAFE_SCALARS[i % SAFE_SCALARS.len()]
        } else {
            SCALARS[i]
        }
    };
    let pname = |i: usize| {
        if tidy {
            SAFE_PARAM_NAMES[i % SAFE_PARAM_NAMES.len()]
        } else {
            PARAM_NAMES[i]
        }
    };
    let mut y = String::new();
    y.push_str(&format!(
        "name: {}\n",
        ["p", "\"\"", "\"a b\"", "[x]"][g.name]
    ));
    if let Some(r) = g.root {
        y.push_str(&format!("root: {}\n", [".", "sub", "\"\"", "./."][r]));
    }
    if g.name != 3 || !g.params.is_empty() {
        y.push_str("params:\n");
        if g.name != 3 {
            y.push_str("  p: 1\n  lr: 3.0e-4\n");
        }
        for (n, v) in &g.params {
            y.push_str(&format!("  {}: {}\n", quote(pname(*n)), value(*v)));
        }
    }
    if !g.env.is_empty() {
        let names: Vec<&str> = g
            .env
            .iter()
            .map(|i| ["HOME", "AUTOSCALE_X", "", "A B", "PATH"][*i])
            .collect();
        y.push_str(&format!(
            "env: {}\n",
            serde_json::to_string(&names).expect("json")
        ));
    }
    if let Some((k, params)) = &g.template {
        y.push_str(&format!(
            "templates:\n  t: &t\n    kind: {}\n",
            quote(&kind_name(kinds, *k))
        ));
        if !params.is_empty() {
            y.push_str("    params:\n");
            for (n, v) in params {
                y.push_str(&format!("      {}: {}\n", quote(pname(*n)), value(*v)));
            }
        }
    }
    y.push_str(if g.stages.is_empty() && tidy {
        "stages: []\n"
    } else {
        "stages:\n"
    });
    let ids: Vec<String> = g
        .stages
        .iter()
        .enumerate()
        .map(|(pos, s)| {
            if s.id < IDS.len() - 4 {
                format!("s{pos}")
            } else {
                IDS[s.id].to_string()
            }
        })
        .collect();
    let resolve = |pos: usize, r: &str| -> String {
        let Some(rest) = r.strip_prefix('@') else {
            return r.to_string();
        };
        let (n, path) = rest.split_once('/').unwrap_or((rest, ""));
        let n: usize = n.parse().unwrap_or(1);
        let target = if pos == 0 {
            "missing".to_string()
        } else {
            ids[pos - 1 - (n - 1) % pos].clone()
        };
        if path.is_empty() {
            target
        } else {
            format!("{target}/{path}")
        }
    };
    for (pos, s) in g.stages.iter().enumerate() {
        let mut fields: Vec<(String, String)> = vec![("id".into(), quote(&ids[pos]))];
        if s.template && g.template.is_some() {
            fields.push(("<<".into(), "*t".into()));
        } else {
            fields.push(("kind".into(), quote(&kind_name(kinds, s.kind))));
        }
        if !s.params.is_empty() {
            let body: Vec<String> = s
                .params
                .iter()
                .map(|(n, v)| format!("{}: {}", quote(pname(*n)), value(*v)))
                .collect();
            fields.push(("params".into(), format!("{{{}}}", body.join(", "))));
        }
        if !s.inputs.is_empty() {
            let body: Vec<String> = s
                .inputs
                .iter()
                .map(|(n, r)| format!("{}: {}", quote(INPUT_NAMES[*n]), quote(&resolve(pos, r))))
                .collect();
            fields.push(("inputs".into(), format!("{{{}}}", body.join(", "))));
        }
        if let Some(c) = s.cmd {
            let cmd = [
                "true",
                "echo ${params.p} > ${out}/x.txt",
                "cat ${inputs.data} > $AUTOSCALE_OUT/y",
                "",
            ][c];
            fields.push(("cmd".into(), quote(cmd)));
        }
        if let Some(outs) = &s.outputs {
            let names: Vec<&str> = outs
                .iter()
                .map(|i| ["x.txt", "../up", "/abs", "", "a/b", "fanout.json"][*i])
                .collect();
            fields.push((
                "outputs".into(),
                serde_json::to_string(&names).expect("json"),
            ));
        }
        match s.fan {
            0 => {
                let axes: Vec<String> = s
                    .axes
                    .iter()
                    .map(|(a, vals)| {
                        let vals: Vec<&str> = vals.iter().map(|v| value(*v)).collect();
                        format!("{}: [{}]", ["a", "b", "lr", "seed"][*a], vals.join(", "))
                    })
                    .collect();
                fields.push(("matrix".into(), format!("{{{}}}", axes.join(", "))));
            }
            1 => {
                let vals: Vec<&str> = s.axes[0].1.iter().map(|v| value(*v)).collect();
                fields.push(("foreach".into(), format!("[{}]", vals.join(", "))));
            }
            2 => fields.push((
                "fanout".into(),
                quote(&resolve(pos, &format!("@{}", 1 + s.fanout % 3))),
            )),
            _ => {}
        }
        if let Some(r) = s.retries {
            fields.push(("retries".into(), ["0", "1", "100", "101", "-1"][r].into()));
        }
        if let Some((c, gpu, m, req)) = s.resources {
            let nums = ["0", "1", "2", "-1", "4294967296", "1.5"];
            let mems = [
                "\"8GiB\"",
                "512",
                "\"1.5 TB\"",
                "\"-1GiB\"",
                "\"lots\"",
                "0",
            ];
            fields.push((
                "resources".into(),
                format!(
                    "{{cpus: {}, gpus: {}, memory: {}, require_gpu: {req}}}",
                    nums[c], nums[gpu], mems[m]
                ),
            ));
        }
        if !s.env.is_empty() {
            let names: Vec<&str> = s
                .env
                .iter()
                .map(|i| ["HOME", "AUTOSCALE_X", "", "A B", "PATH"][*i])
                .collect();
            fields.push(("env".into(), serde_json::to_string(&names).expect("json")));
        }
        if g.flow {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            y.push_str(&format!("  - {{{}}}\n", body.join(", ")));
        } else {
            for (i, (k, v)) in fields.iter().enumerate() {
                y.push_str(if i == 0 { "  - " } else { "    " });
                y.push_str(&format!("{k}: {v}\n"));
            }
        }
    }
    y
}

#[derive(Debug, Clone)]
struct PipelineCase {
    text: Vec<u8>,
    sets: Vec<String>,
    overlay: Option<Vec<u8>>,
    targets: Vec<String>,
    children: Vec<(String, Vec<(usize, usize)>)>,
    /// Also run `autoscale status` on it in a child process.
    child: bool,
}

impl FuzzInput for PipelineCase {
    fn artifact(&self) -> Vec<u8> {
        let mut out = self.text.clone();
        out.extend_from_slice(
            format!(
                "\n# --- sets: {:?}\n# --- targets: {:?}\n# --- overlay:\n",
                self.sets, self.targets
            )
            .as_bytes(),
        );
        if let Some(o) = &self.overlay {
            out.extend_from_slice(o);
        }
        out
    }
}

struct PipelineSeeds {
    pipelines: Vec<Vec<u8>>,
    overlays: Vec<Vec<u8>>,
    kinds: Vec<&'static str>,
}

fn pipeline_seeds() -> PipelineSeeds {
    let mut pipelines = Vec::new();
    let mut overlays = Vec::new();
    for (name, bytes) in read_dir_files(&repo().join("pipelines"), &["yaml"])
        .into_iter()
        .chain(read_dir_files(
            &repo().join("tests/fuzz/corpus/pipeline"),
            &["yaml"],
        ))
    {
        // An overlay has no `stages:` list of its own, only `stages: {id: ...}` or none.
        let text = String::from_utf8_lossy(&bytes);
        if name.starts_with("overlay") || !text.contains("\nname:") {
            overlays.push(bytes);
        } else {
            pipelines.push(bytes);
        }
    }
    assert!(
        pipelines.len() >= 4,
        "pipeline seeds found: {}",
        pipelines.len()
    );
    let kinds = autoscale_stages::builtin_kinds();
    PipelineSeeds {
        pipelines,
        overlays,
        kinds: kinds.names().collect(),
    }
}

fn pipeline_case(seeds: &PipelineSeeds) -> impl Strategy<Value = PipelineCase> + use<> {
    let pipelines = seeds.pipelines.clone();
    let pool: Vec<Vec<u8>> = seeds
        .pipelines
        .iter()
        .chain(&seeds.overlays)
        .cloned()
        .collect();
    let overlays = seeds.overlays.clone();
    let kinds = seeds.kinds.clone();
    let kinds2 = kinds.clone();
    let pool2 = pool.clone();
    let mutated = (0..pipelines.len(), mutations())
        .prop_map(move |(i, m)| mutate(&pipelines[i], &m, &pool, YAML_TOKENS));
    let structured = gen_pipeline().prop_map(move |g| render_pipeline(&g, &kinds).into_bytes());
    let structured_mutated = (gen_pipeline(), mutations()).prop_map(move |(g, m)| {
        mutate(
            render_pipeline(&g, &kinds2).as_bytes(),
            &m,
            &pool2,
            YAML_TOKENS,
        )
    });
    let text = prop_oneof![4 => mutated, 4 => structured, 2 => structured_mutated];
    let overlay_pool = overlays.clone();
    let overlay = proptest::option::weighted(
        0.15,
        (0..overlays.len().max(1), mutations(), any::<bool>()).prop_map(move |(i, m, raw)| {
            let base = overlay_pool.get(i).cloned().unwrap_or_default();
            if raw {
                base
            } else {
                mutate(&base, &m, &overlay_pool, YAML_TOKENS)
            }
        }),
    );
    let set = (
        0..PARAM_NAMES.len(),
        0..IDS.len(),
        any::<bool>(),
        0..SCALARS.len(),
        0..8usize,
    )
        .prop_map(|(p, s, staged, v, form)| {
            let name = if staged {
                format!("{}.{}", IDS[s], PARAM_NAMES[p])
            } else {
                PARAM_NAMES[p].to_string()
            };
            match form {
                0..=2 => format!("p={}", SAFE_SCALARS[v % 4]),
                3 => format!("lr={}", ["1e-3", "0", "-2.5", "\"x\""][v % 4]),
                4 => format!("{name}={}", SCALARS[v]),
                5 => name,
                6 => format!("={}", SCALARS[v]),
                _ => format!("{name}=={}", SCALARS[v]),
            }
        });
    (
        text,
        prop_oneof![3 => Just(Vec::new()), 1 => proptest::collection::vec(set, 1..3)],
        overlay,
        proptest::collection::vec((0..IDS.len()).prop_map(|i| IDS[i].to_string()), 0..3),
        proptest::collection::vec(
            (
                "[a-z0-9_.\\-\\[\\] ]{0,6}",
                proptest::collection::vec((0..PARAM_NAMES.len(), 0..SCALARS.len()), 0..3),
            ),
            0..4,
        ),
        proptest::bool::weighted(0.04),
    )
        .prop_map(
            |(text, sets, overlay, targets, children, child)| PipelineCase {
                text,
                sets,
                overlay,
                targets,
                children,
                child,
            },
        )
}

struct PipelineState {
    dir: tempfile::TempDir,
    kinds: KindRegistry,
}

fn pipeline_property(state: &mut PipelineState, case: &PipelineCase) -> Verdict {
    let mut tags = Vec::new();
    let ws = state.dir.path().join("ws");
    let file = ws.join("p.yaml");
    fs::write(&file, &case.text).map_err(|e| e.to_string())?;
    let mut overrides = Overrides {
        overlays: Vec::new(),
        sets: case.sets.clone(),
    };
    if let Some(o) = &case.overlay {
        let path = ws.join("overlay.yaml");
        fs::write(&path, o).map_err(|e| e.to_string())?;
        overrides.overlays.push(path);
    }
    let loaded = Pipeline::load(&file, &overrides, &state.kinds);
    let mut safe_for_child = true;
    match loaded {
        Err(errors) => {
            tags.push("load: error");
            if std::env::var_os("AUTOSCALE_FUZZ_DEBUG").is_some() {
                eprintln!(
                    "--- load error: {}\n{}",
                    errors,
                    String::from_utf8_lossy(&case.text)
                );
            }
            // Every error renders (what the CLI prints: message, location, the source line)
            // without panicking.
            let _ = errors.to_string();
            for e in &errors.0 {
                let _ = e.source_line();
            }
        }
        Ok(mut p) => {
            tags.push("load: ok");
            if p.stages.len() > 1 {
                tags.push("load: ok, 2+ stages");
            }
            if p.stages.iter().any(|s| s.fanout_from.is_some()) {
                tags.push("load: ok, run-time fan-out");
            }
            if !p.groups().is_empty() {
                tags.push("load: ok, static fan-out");
            }
            for i in 0..p.stages.len() {
                let _ = p.dependencies(i);
            }
            match p.select(&case.targets) {
                Ok(_) => tags.push("select: ok"),
                Err(e) => {
                    tags.push("select: error");
                    let _ = e.to_string();
                }
            }
            let children: Vec<FanoutChild> = case
                .children
                .iter()
                .map(|(id, params)| FanoutChild {
                    id: id.clone(),
                    params: params
                        .iter()
                        .map(|(n, v)| {
                            (
                                PARAM_NAMES[*n].to_string(),
                                serde_json::from_str(SCALARS[*v]).unwrap_or(Value::Null),
                            )
                        })
                        .collect(),
                })
                .collect();
            if let Some(&(placeholder, _)) = p.fanout_placeholders().first() {
                match p.expand_fanout(placeholder, &children) {
                    Ok(()) => tags.push("expand_fanout: ok"),
                    Err(_) => tags.push("expand_fanout: error"),
                }
                for i in 0..p.stages.len() {
                    let _ = p.dependencies(i);
                }
            }
            // A child `status` hashes file inputs: only those inside the sandbox.
            let inside = |path: &Path| {
                path.components()
                    .all(|c| c != std::path::Component::ParentDir)
                    && path.starts_with(state.dir.path())
            };
            safe_for_child = inside(&p.root)
                && p.stages.iter().all(|s| {
                    s.inputs.values().all(|i| match i {
                        InputRef::File(f) => inside(&p.root.join(f)),
                        _ => true,
                    })
                });
        }
    }
    if case.child && safe_for_child && can_limit_children() {
        let mut args: Vec<&str> = vec!["status", "p.yaml"];
        for s in &case.sets {
            args.push("--set");
            args.push(s);
        }
        if case.overlay.is_some() {
            args.push("--with");
            args.push("overlay.yaml");
        }
        let cache = state.dir.path().join("cache");
        run_child(&ws, &cache, &args)?;
        tags.push("child status");
    }
    Ok(tags)
}

#[test]
fn fuzz_pipeline_loader() {
    let seeds = pipeline_seeds();
    let strategy = pipeline_case(&seeds);
    // The seeds' file inputs, relative to their `root: ..`: the sandbox.
    let mut file_inputs = BTreeSet::new();
    for text in &seeds.pipelines {
        let text = String::from_utf8_lossy(text);
        for (i, _) in text.match_indices("file:") {
            let path: String = text[i + 5..]
                .chars()
                .take_while(|c| !c.is_whitespace() && !",}]\"'".contains(*c))
                .collect();
            if !path.is_empty() && !path.starts_with('/') && !path.contains("..") {
                file_inputs.insert(path);
            }
        }
    }
    let report = fuzz(
        "pipeline",
        strategy,
        move || {
            let dir = sandbox();
            fs::create_dir_all(dir.path().join("ws/sub")).expect("mkdir");
            fs::write(dir.path().join("ws/data.txt"), "some data\n").expect("data");
            for path in &file_inputs {
                let p = dir.path().join(path);
                if p.extension().is_some() {
                    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
                    fs::write(&p, "x\n").expect("write");
                } else {
                    fs::create_dir_all(&p).expect("mkdir");
                    fs::write(p.join("a.txt"), "x\n").expect("write");
                }
            }
            PipelineState {
                dir,
                kinds: autoscale_stages::builtin_kinds(),
            }
        },
        pipeline_property,
    );
    assert_clean("pipeline", &report);
}

// ------------------------------------------------------------------------------------------
// A real cache, shared by targets (b) and (c)

/// A pipeline whose results cover what a manifest can hold: nested folders, an executable, an
/// empty file, a large compressible file and a long log (stored compressed).
const SEED_PIPELINE: &str = r#"
name: seeds
stages:
  - id: nested
    kind: command
    cmd: "mkdir -p $AUTOSCALE_OUT/a/b; echo deep > $AUTOSCALE_OUT/a/b/c.txt; printf '#!/bin/sh\necho hi\n' > $AUTOSCALE_OUT/run.sh; chmod +x $AUTOSCALE_OUT/run.sh; : > $AUTOSCALE_OUT/empty"
  - id: big
    kind: command
    inputs: {n: nested/a/b/c.txt}
    cmd: "seq 1 20000 > $AUTOSCALE_OUT/numbers.txt; seq 1 3000; cat $AUTOSCALE_INPUT_N > $AUTOSCALE_OUT/copy.txt"
  - id: fan
    kind: command
    foreach: [p, q]
    inputs: {all: big}
    cmd: "echo $AUTOSCALE_PARAM_ITEM > $AUTOSCALE_OUT/item.txt"
    params: {item: "${item}"}
"#;

/// A cache with committed entries, and a directory remote they were pushed to.
struct Fixture {
    _dir: tempfile::TempDir,
    cache: PathBuf,
    remote: PathBuf,
}

fn fixture() -> Fixture {
    let ws = common::Workspace::new();
    ws.write("p.yaml", SEED_PIPELINE);
    let out = ws.run(&["run", "p.yaml"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let remote = ws.path().join("remote");
    fs::create_dir_all(&remote).expect("mkdir");
    let remote_arg = remote.display().to_string();
    let out = ws.run(&["--remote", &remote_arg, "cache", "push"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    Fixture {
        cache: ws.cache(),
        remote,
        _dir: ws.dir,
    }
}

/// Every file under `root`, relative path -> bytes.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(meta) = fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                walk(root, &p, out);
            } else if meta.is_file() {
                let rel = p.strip_prefix(root).expect("under root").to_path_buf();
                out.insert(rel, fs::read(&p).unwrap_or_default());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Writes a snapshot under `root`, files read-only as in a cache.
fn restore(root: &Path, files: &BTreeMap<PathBuf, Vec<u8>>) {
    for (rel, bytes) in files {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, bytes).expect("write");
    }
}

/// Removes a folder the cache may have made read-only in parts.
fn remove_all(root: &Path) -> Result<(), String> {
    if !root.exists() || fs::remove_dir_all(root).is_ok() {
        return Ok(());
    }
    let _ = Command::new("chmod")
        .args(["-R", "u+rwX"])
        .arg(root)
        .status();
    fs::remove_dir_all(root).map_err(|e| format!("remove {}: {e}", root.display()))
}

const JSON_TOKENS: &[&str] = &[
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1e400",
    "0.5",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "\"\"",
    "\"a\"",
    "\"../x\"",
    "\"/etc/passwd\"",
    "\"a/\"",
    "\"./a\"",
    "\"a//b\"",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"\\/\"",
    "\"é\"",
    "\"schema\":2",
    "\"schema\":1",
    "\"format\":2",
    "\"format\":1",
    "\"compressed\":[]",
    "\"files\":[]",
    "\"log\":null",
    "\"executable\":true",
    "\"size\":0",
    "\"size\":18446744073709551615",
    "{\"path\":\"x\",\"digest\":\"",
    "\"record\":{}",
    "\"metadata\":[]",
    "\"timings\":{}",
    "\"key\":\"",
    "\"tree\":\"",
    "\"0000000000000000000000000000000000000000000000000000000000000000\"",
    "\"ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff\"",
    " ",
    "\n",
    "\t",
    "\u{feff}",
    "\\",
    "\\\"",
];

const PATHS: &[&str] = &[
    "x",
    "a/b/c.txt",
    "run.sh",
    "empty",
    "numbers.txt",
    "",
    "a",
    "a/",
    "./a",
    "a//b",
    "../a",
    "/abs",
    "a/../b",
    ".",
    "a/./b",
    "é",
    "a\u{0}b",
    "x\\y",
    "numbers.txt/sub",
];

/// A manifest assembled from parts: real or made-up keys, digests, sizes and paths, with a
/// correct tree digest most of the time.
#[derive(Debug, Clone)]
struct GenManifest {
    schema: u8,
    key: u8,
    files: Vec<(usize, u8, u8, bool)>,
    log: u8,
    record: u8,
    tree_ok: bool,
}

fn gen_manifest() -> impl Strategy<Value = GenManifest> {
    (
        0u8..6,
        0u8..8,
        proptest::collection::vec((0..PATHS.len(), 0u8..8, 0u8..10, any::<bool>()), 0..6),
        0u8..6,
        0u8..5,
        proptest::bool::weighted(0.7),
    )
        .prop_map(|(schema, key, files, log, record, tree_ok)| GenManifest {
            schema,
            key,
            files,
            log,
            record,
            tree_ok,
        })
}

/// What the generators draw real values from.
#[derive(Clone)]
struct Live {
    keys: Vec<ActionKey>,
    /// Blob digests and sizes.
    blobs: Vec<(ArtifactDigest, u64)>,
}

fn render_manifest(g: &GenManifest, live: &Live, filed_under: ActionKey) -> Value {
    let made_up = |n: u8| {
        let mut b = [n; 32];
        b[0] = 0xab;
        b
    };
    let key = match g.key {
        0..=4 => filed_under,
        5 => live.keys[g.key as usize % live.keys.len()],
        _ => ActionKey::from_bytes(made_up(g.key)),
    };
    let files: Vec<(String, ArtifactDigest, u64, bool)> = g
        .files
        .iter()
        .map(|&(p, d, s, x)| {
            let (digest, size) = if (d as usize) < live.blobs.len() && d < 6 {
                live.blobs[d as usize]
            } else {
                (ArtifactDigest::from_bytes(made_up(d)), 3)
            };
            let size = match s {
                0..=5 => size,
                6 => 0,
                7 => size + 1,
                8 => u64::MAX,
                _ => 1 << 62,
            };
            (PATHS[p].to_string(), digest, size, x)
        })
        .collect();
    let tree = if g.tree_ok {
        tree_digest(files.iter().map(|(p, d, _, x)| (p.as_str(), d, *x)))
    } else {
        ArtifactDigest::from_bytes(made_up(7))
    };
    let log = match g.log {
        0 | 1 => Value::Null,
        2 | 3 => json!(live.blobs[live.blobs.len() - 1].0),
        _ => json!(ArtifactDigest::from_bytes(made_up(9))),
    };
    let record = match g.record {
        0 => json!({}),
        1 => json!({"schema": 1, "kind": "command", "params": {"cmd": "true"}}),
        2 => json!([1, 2, 3]),
        3 => json!("text"),
        _ => json!(null),
    };
    let schema = [1, 1, 1, 0, 2, 4294967295u64][g.schema as usize];
    json!({
        "schema": schema,
        "key": key,
        "tree": tree,
        "files": files.iter().map(|(p, d, s, x)| json!({"path": p, "digest": d, "size": s, "executable": x})).collect::<Vec<_>>(),
        "log": log,
        "record": record,
        "metadata": {"stage": "fuzz"},
        "timings": {"started_unix_ms": 1, "duration_ms": 2},
    })
}

// ------------------------------------------------------------------------------------------
// Target (b): local manifests

#[derive(Debug, Clone)]
enum BlobDamage {
    None,
    /// Flip a byte of the n-th blob file.
    Flip(usize, usize),
    /// Truncate the n-th blob file.
    Truncate(usize, usize),
    /// Replace the n-th blob file with garbage.
    Garbage(usize, Vec<u8>),
    /// Remove the n-th blob file.
    Remove(usize),
}

fn blob_damage() -> impl Strategy<Value = BlobDamage> {
    prop_oneof![
        6 => Just(BlobDamage::None),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(n, p)| BlobDamage::Flip(n, p)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(n, p)| BlobDamage::Truncate(n, p)),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(n, b)| BlobDamage::Garbage(n, b)),
        1 => any::<usize>().prop_map(BlobDamage::Remove),
    ]
}

/// Damages one of `files` (those whose path passes `is_blob`) in place; the file it touched.
fn damage(
    files: &mut BTreeMap<PathBuf, Vec<u8>>,
    is_blob: impl Fn(&Path) -> bool,
    how: &BlobDamage,
) -> Option<PathBuf> {
    let names: Vec<PathBuf> = files.keys().filter(|p| is_blob(p)).cloned().collect();
    if names.is_empty() {
        return None;
    }
    let pick = |n: usize| names[n % names.len()].clone();
    let before = files.clone();
    let touched = match how {
        BlobDamage::None => None,
        BlobDamage::Flip(n, p) => {
            let name = pick(*n);
            let b = files.get_mut(&name)?;
            if b.is_empty() {
                b.push(1);
            } else {
                let i = p % b.len();
                b[i] ^= 0x20;
            }
            Some(name)
        }
        BlobDamage::Truncate(n, p) => {
            let name = pick(*n);
            let b = files.get_mut(&name)?;
            let len = b.len();
            b.truncate(p % len.max(1));
            Some(name)
        }
        BlobDamage::Garbage(n, g) => {
            let name = pick(*n);
            files.insert(name.clone(), g.clone());
            Some(name)
        }
        BlobDamage::Remove(n) => {
            let name = pick(*n);
            files.remove(&name);
            Some(name)
        }
    };
    // Only a real change counts (truncating an empty file changes nothing). A blob is named by
    // the digest of what it holds: a compressed blob whose frame still decodes to the same bytes
    // (a flipped bit in the window size, say) is intact, and `verify` rightly says so.
    touched.filter(|name| {
        let (old, new) = (before.get(name), files.get(name));
        if old == new {
            return false;
        }
        let compressed = name.extension().is_some_and(|e| e == "zst");
        match (old, new) {
            (Some(old), Some(new)) if compressed => {
                match (zstd::decode_all(&old[..]), zstd::decode_all(&new[..])) {
                    (Ok(a), Ok(b)) => a != b,
                    _ => true,
                }
            }
            _ => true,
        }
    })
}

/// The digest a blob file is named by (`blobs/ab/<hex>` or `<hex>.zst`).
fn blob_digest(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    Some(name.strip_suffix(".zst").unwrap_or(name).to_string())
}

#[derive(Debug, Clone)]
struct ManifestCase {
    /// Which live entry's manifest to replace.
    entry: usize,
    bytes: Vec<u8>,
    damage: BlobDamage,
    /// Remove the entry's output tree first (so that `materialize` rebuilds it).
    drop_tree: bool,
    child: bool,
}

impl FuzzInput for ManifestCase {
    fn artifact(&self) -> Vec<u8> {
        self.bytes.clone()
    }
}

struct ManifestState {
    sandbox: tempfile::TempDir,
    pristine: BTreeMap<PathBuf, Vec<u8>>,
    keys: Vec<ActionKey>,
    /// The blobs (hex digests) each live entry's manifest names, its log included.
    refs: BTreeMap<ActionKey, BTreeSet<String>>,
}

fn is_blob_file(p: &Path) -> bool {
    p.starts_with("v1/blobs")
}

fn manifest_property(state: &mut ManifestState, case: &ManifestCase) -> Verdict {
    let mut tags = Vec::new();
    let root = state.sandbox.path().join("cache");
    remove_all(&root)?;
    let mut files = state.pristine.clone();
    let damaged = damage(&mut files, is_blob_file, &case.damage);
    if damaged.is_some() {
        tags.push("blob damaged");
    }
    let damaged_digest = damaged.as_deref().and_then(blob_digest);
    // Mostly where the manifest says it belongs, else under another key.
    let key = named_key(&case.bytes, &state.keys)
        .filter(|_| !case.entry.is_multiple_of(4))
        .unwrap_or(state.keys[case.entry % state.keys.len()]);
    let (manifest_path, out_dir) = autoscale_cache::entry_paths(&root, &key);
    let rel = manifest_path
        .strip_prefix(&root)
        .expect("under the root")
        .to_path_buf();
    files.insert(rel, case.bytes.clone());
    restore(&root, &files);
    if case.drop_tree {
        remove_all(&out_dir)?;
    }
    let cache = Cache::open(&root).map_err(|e| format!("open: {e}"))?;
    match cache.lookup_local(&key) {
        // A broken entry is set aside: its manifest is moved away.
        Ok(None) if manifest_path.exists() => {
            return Err("lookup_local: the manifest is there but reads as absent".into());
        }
        Ok(None) => tags.push("lookup_local: set aside"),
        Ok(Some(m)) => {
            tags.push("lookup_local: ok");
            for f in &m.files {
                let _ = m.digest_of(&f.path);
            }
            let _ = m.digest_of("");
            let _ = m.digest_of("a");
            let _ = m.record_value();
            let _ = m.metadata_value();
            let _ = m.total_size();
            match cache.materialize(&m) {
                Ok(dir) => {
                    tags.push("materialize: ok");
                    if !dir.starts_with(&root) {
                        return Err(format!(
                            "materialize gave {} outside the cache",
                            dir.display()
                        ));
                    }
                }
                Err(_) => tags.push("materialize: error"),
            }
        }
        Err(e) => {
            tags.push("lookup_local: error");
            let _ = e.to_string();
        }
    }
    match cache.find(&key) {
        Ok(_) => tags.push("find: ok"),
        Err(_) => tags.push("find: error"),
    }
    match cache.list() {
        Ok(_) => tags.push("list: ok"),
        Err(_) => tags.push("list: error"),
    }
    match cache.gc(&autoscale_cache::GcOptions {
        keep: None,
        max_bytes: Some(case.entry as u64 % 300_000),
        dry_run: true,
    }) {
        Ok(_) => tags.push("gc dry run: ok"),
        Err(e) => {
            tags.push("gc dry run: error");
            if std::env::var_os("AUTOSCALE_FUZZ_DEBUG").is_some() {
                eprintln!("--- gc error: {}", autoscale_errors::one_line(&e));
            }
        }
    }
    // A damaged blob that an untouched entry names must be reported, never an error.
    let must_report = damaged_digest.as_ref().is_some_and(|d| {
        state
            .refs
            .iter()
            .any(|(k, blobs)| *k != key && blobs.contains(d))
    });
    match cache.verify() {
        Ok(report) => {
            tags.push("verify: ok");
            if !report.problems.is_empty() {
                tags.push("verify: problems reported");
            }
            if must_report && report.problems.is_empty() {
                return Err(format!(
                    "verify did not report the damaged blob {}",
                    damaged.as_deref().unwrap_or(Path::new("")).display()
                ));
            }
        }
        Err(e) => {
            return Err(format!(
                "verify failed instead of reporting a problem: {}",
                autoscale_errors::one_line(&e)
            ));
        }
    }
    // Nothing may appear beside the cache.
    let beside: Vec<String> = fs::read_dir(state.sandbox.path())
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "cache")
        .collect();
    if !beside.is_empty() {
        return Err(format!("files appeared outside the cache: {beside:?}"));
    }
    if case.child && can_limit_children() {
        run_child(state.sandbox.path(), &root, &["--json", "cache", "verify"])?;
        run_child(state.sandbox.path(), &root, &["--json", "cache", "ls"])?;
        tags.push("child verify + ls");
    }
    Ok(tags)
}

fn manifest_case(seeds: Vec<Vec<u8>>, live: Live) -> impl Strategy<Value = ManifestCase> {
    let edited = edited(seeds.clone(), live.clone());
    let pool = seeds.clone();
    let seeds2 = seeds.clone();
    let mutated = (0..seeds.len(), mutations())
        .prop_map(move |(i, m)| mutate(&seeds[i], &m, &pool, JSON_TOKENS));
    let live2 = live.clone();
    let structured = (gen_manifest(), 0..live.keys.len()).prop_map(move |(g, k)| {
        serde_json::to_vec(&render_manifest(&g, &live, live.keys[k])).expect("json")
    });
    let structured_mutated =
        (gen_manifest(), 0..live2.keys.len(), mutations()).prop_map(move |(g, k, m)| {
            let bytes =
                serde_json::to_vec(&render_manifest(&g, &live2, live2.keys[k])).expect("json");
            mutate(&bytes, &m, &seeds2, JSON_TOKENS)
        });
    (
        any::<usize>(),
        prop_oneof![4 => mutated, 4 => edited, 2 => structured, 1 => structured_mutated],
        blob_damage(),
        proptest::bool::weighted(0.3),
        proptest::bool::weighted(0.02),
    )
        .prop_map(|(entry, bytes, damage, drop_tree, child)| ManifestCase {
            entry,
            bytes,
            damage,
            drop_tree,
            child,
        })
}

/// A semantic edit of a real manifest: the bytes stay valid JSON of the right shape, so the
/// checks past parsing are reached.
#[derive(Debug, Clone)]
enum Edit {
    Size(usize, u8),
    Digest(usize, usize),
    Path(usize, usize),
    Executable(usize),
    DuplicateFile(usize),
    DropFile(usize),
    AddFile(usize, usize),
    Log(u8),
    Key(usize),
    Schema(u8),
    /// Remote envelopes: the list of blobs stored compressed.
    Compressed(u8),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        3 => (any::<usize>(), 0u8..6).prop_map(|(f, s)| Edit::Size(f, s)),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(f, d)| Edit::Digest(f, d)),
        3 => (any::<usize>(), 0..PATHS.len()).prop_map(|(f, p)| Edit::Path(f, p)),
        1 => any::<usize>().prop_map(Edit::Executable),
        1 => any::<usize>().prop_map(Edit::DuplicateFile),
        1 => any::<usize>().prop_map(Edit::DropFile),
        2 => (0..PATHS.len(), any::<usize>()).prop_map(|(p, d)| Edit::AddFile(p, d)),
        1 => (0u8..4).prop_map(Edit::Log),
        1 => any::<usize>().prop_map(Edit::Key),
        1 => (0u8..4).prop_map(Edit::Schema),
        2 => (0u8..5).prop_map(Edit::Compressed),
    ];
    proptest::collection::vec(edit, 1..4)
}

/// Applies `edits` to the manifest inside `doc` (the document itself, or a remote envelope's
/// `manifest`), then recomputes its tree digest when `fix_tree`.
fn apply_edits(doc: &mut Value, edits: &[Edit], live: &Live, fix_tree: bool) {
    let envelope = doc.get("manifest").is_some();
    for e in edits {
        if let Edit::Compressed(c) = e {
            if envelope {
                doc["compressed"] = match c {
                    0 => json!([]),
                    1 => json!(live.blobs.iter().map(|(d, _)| d).collect::<Vec<_>>()),
                    2 => json!(["nothex"]),
                    3 => json!([live.blobs[0].0, live.blobs[0].0]),
                    _ => json!(null),
                };
            }
            continue;
        }
        let m = if envelope {
            &mut doc["manifest"]
        } else {
            &mut *doc
        };
        let Some(files) = m["files"].as_array_mut() else {
            continue;
        };
        let n = files.len().max(1);
        match e {
            Edit::Size(f, s) if !files.is_empty() => {
                let old = files[f % n]["size"].as_u64().unwrap_or(0);
                files[f % n]["size"] = json!(match s {
                    0 => old.wrapping_add(1),
                    1 => old.saturating_sub(1),
                    2 => 0,
                    3 => u64::MAX,
                    4 => 1 << 40,
                    _ => old.wrapping_mul(2),
                });
            }
            Edit::Digest(f, d) if !files.is_empty() => {
                files[f % n]["digest"] = json!(live.blobs[d % live.blobs.len()].0);
            }
            Edit::Path(f, p) if !files.is_empty() => files[f % n]["path"] = json!(PATHS[*p]),
            Edit::Executable(f) if !files.is_empty() => {
                let x = files[f % n]["executable"].as_bool().unwrap_or(false);
                files[f % n]["executable"] = json!(!x);
            }
            Edit::DuplicateFile(f) if !files.is_empty() => {
                let copy = files[f % n].clone();
                files.push(copy);
            }
            Edit::DropFile(f) if !files.is_empty() => {
                files.remove(f % n);
            }
            Edit::AddFile(p, d) => {
                let (digest, size) = live.blobs[d % live.blobs.len()];
                files.push(
                    json!({"path": PATHS[*p], "digest": digest, "size": size, "executable": false}),
                );
            }
            Edit::Log(l) => {
                m["log"] = match l {
                    0 => Value::Null,
                    1 => json!(live.blobs[0].0),
                    2 => json!("0000"),
                    _ => json!(ArtifactDigest::from_bytes([3; 32])),
                };
            }
            Edit::Key(k) => m["key"] = json!(live.keys[k % live.keys.len()]),
            Edit::Schema(v) => m["schema"] = json!([0, 2, 1, -1][*v as usize]),
            _ => {}
        }
    }
    if fix_tree {
        let m = if envelope {
            &mut doc["manifest"]
        } else {
            &mut *doc
        };
        let files: Option<Vec<(String, ArtifactDigest, bool)>> = m["files"].as_array().map(|fs| {
            fs.iter()
                .filter_map(|f| {
                    Some((
                        f["path"].as_str()?.to_string(),
                        f["digest"].as_str()?.parse().ok()?,
                        f["executable"].as_bool().unwrap_or(false),
                    ))
                })
                .collect()
        });
        if let Some(files) = files {
            m["tree"] = json!(tree_digest(files.iter().map(|(p, d, x)| (
                p.as_str(),
                d,
                *x
            ))));
        }
    }
}

/// Real manifests (or envelopes) with semantic edits.
fn edited(seeds: Vec<Vec<u8>>, live: Live) -> impl Strategy<Value = Vec<u8>> {
    let docs: Vec<Value> = seeds
        .iter()
        .filter_map(|b| serde_json::from_slice(b).ok())
        .collect();
    assert!(!docs.is_empty(), "no seed parses");
    (0..docs.len(), edits(), proptest::bool::weighted(0.7)).prop_map(move |(i, e, fix)| {
        let mut doc = docs[i].clone();
        apply_edits(&mut doc, &e, &live, fix);
        serde_json::to_vec(&doc).expect("json")
    })
}

/// The key a manifest (or an envelope's manifest) names, when it is one of `keys`.
fn named_key(bytes: &[u8], keys: &[ActionKey]) -> Option<ActionKey> {
    let doc: Value = serde_json::from_slice(bytes).ok()?;
    let m = doc.get("manifest").unwrap_or(&doc);
    let key: ActionKey = m["key"].as_str()?.parse().ok()?;
    keys.contains(&key).then_some(key)
}

/// The live keys, their manifests, and the blobs they name.
fn live_entries(cache_root: &Path) -> (Vec<ActionKey>, Vec<Vec<u8>>, Live) {
    let cache = Cache::open(cache_root).expect("open");
    let mut keys = Vec::new();
    let mut manifests = Vec::new();
    let mut blobs = BTreeSet::new();
    for a in cache.list().expect("list") {
        let m = cache
            .lookup_local(&a.key)
            .expect("lookup")
            .expect("present");
        for f in &m.files {
            blobs.insert((f.digest, f.size));
        }
        if let Some(log) = m.log {
            blobs.insert((log, 0));
        }
        manifests.push(fs::read(cache.manifest_path(&a.key)).expect("read"));
        keys.push(a.key);
    }
    assert!(
        keys.len() >= 3,
        "the seed pipeline made {} entries",
        keys.len()
    );
    let live = Live {
        keys: keys.clone(),
        blobs: blobs.into_iter().collect(),
    };
    (keys, manifests, live)
}

#[test]
fn fuzz_manifest_decoding() {
    let fx = fixture();
    let (keys, mut seeds, live) = live_entries(&fx.cache);
    seeds.extend(
        read_dir_files(&repo().join("tests/fuzz/corpus/manifest"), &["json"])
            .into_iter()
            .map(|(_, b)| b),
    );
    let pristine = snapshot(&fx.cache);
    assert!(
        pristine
            .keys()
            .any(|p| p.extension().is_some_and(|e| e == "zst")),
        "the fixture has a compressed blob"
    );
    let refs: BTreeMap<ActionKey, BTreeSet<String>> = {
        let cache = Cache::open(&fx.cache).expect("open");
        keys.iter()
            .map(|k| {
                let m = cache.lookup_local(k).expect("lookup").expect("present");
                let blobs = m
                    .files
                    .iter()
                    .map(|f| f.digest)
                    .chain(m.log)
                    .map(|d| d.to_hex())
                    .collect();
                (*k, blobs)
            })
            .collect()
    };
    let strategy = manifest_case(seeds, live);
    let report = fuzz(
        "manifest",
        strategy,
        move || ManifestState {
            sandbox: sandbox(),
            pristine,
            keys,
            refs,
        },
        manifest_property,
    );
    assert_clean("manifest", &report);
}

// ------------------------------------------------------------------------------------------
// Target (c): remote entries

#[derive(Debug, Clone)]
struct RemoteCase {
    entry: usize,
    bytes: Vec<u8>,
    damage: BlobDamage,
    /// Lookup (download on a miss) or pull.
    pull: bool,
    /// Tight limits on what an entry may claim.
    tight: bool,
}

impl FuzzInput for RemoteCase {
    fn artifact(&self) -> Vec<u8> {
        self.bytes.clone()
    }
}

struct RemoteState {
    sandbox: tempfile::TempDir,
    pristine: BTreeMap<PathBuf, Vec<u8>>,
    keys: Vec<ActionKey>,
}

fn remote_property(state: &mut RemoteState, case: &RemoteCase) -> Verdict {
    let mut tags = Vec::new();
    let sandbox = state.sandbox.path();
    for sub in ["remote", "local"] {
        remove_all(&sandbox.join(sub))?;
    }
    let remote_root = sandbox.join("remote");
    let mut files = state.pristine.clone();
    if damage(&mut files, is_blob_file, &case.damage).is_some() {
        tags.push("blob damaged");
    }
    let key = named_key(&case.bytes, &state.keys)
        .filter(|_| !case.entry.is_multiple_of(4))
        .unwrap_or(state.keys[case.entry % state.keys.len()]);
    let hex = key.to_hex();
    files.insert(
        PathBuf::from(format!("v1/actions/{}/{hex}.json", &hex[..2])),
        case.bytes.clone(),
    );
    restore(&remote_root, &files);
    let local_root = sandbox.join("local");
    let mut remote = Remote::at(
        RemoteLocation::Directory(remote_root.clone()),
        RemoteMode::ReadOnly,
        Duration::from_secs(5),
    )
    .map_err(|e| format!("Remote::at: {e}"))?;
    if case.tight {
        remote = remote.with_limits(RemoteLimits {
            max_entry_bytes: 2048,
            max_blob_bytes: 4096,
            max_entry_total_bytes: 8192,
            max_files: 3,
        });
    }
    let cache = Cache::open(&local_root)
        .map_err(|e| format!("open: {e}"))?
        .with_remote(remote);
    match cache.find(&key) {
        Ok(Some(_)) => tags.push("find: remote hit"),
        Ok(None) => tags.push("find: miss or refused"),
        Err(e) => return Err(format!("find returned an error for a remote problem: {e}")),
    }
    let got = if case.pull {
        match cache.pull(Some(&[key])) {
            Ok(r) => {
                tags.push("pull: ok");
                (r.transferred > 0).then_some(())
            }
            Err(_) => {
                tags.push("pull: error");
                None
            }
        }
    } else {
        match cache.lookup(&key) {
            Ok(Some(_)) => Some(()),
            Ok(None) => None,
            Err(e) => {
                return Err(format!(
                    "lookup returned an error for a remote problem: {e}"
                ));
            }
        }
    };
    for w in cache.take_remote_warnings() {
        let _ = w.to_string();
    }
    // Whatever was accepted must be whole and true in the local cache.
    if got.is_some() || cache.lookup_local(&key).ok().flatten().is_some() {
        tags.push("downloaded");
        let report = cache
            .verify()
            .map_err(|e| format!("verify after a download: {e}"))?;
        if !report.problems.is_empty() {
            return Err(format!(
                "a downloaded entry fails verify: {:?}",
                report.problems
            ));
        }
        let m = cache
            .lookup_local(&key)
            .map_err(|e| format!("{e}"))?
            .ok_or("the downloaded entry is not local")?;
        let dir = cache
            .materialize(&m)
            .map_err(|e| format!("materialize: {e}"))?;
        for f in &m.files {
            let on_disk = autoscale_cache::hash_file(&dir.join(&f.path))
                .map_err(|e| format!("hash {}: {e}", f.path))?;
            if on_disk != f.digest {
                return Err(format!(
                    "downloaded file {} does not hash to its digest",
                    f.path
                ));
            }
        }
    }
    let beside: Vec<String> = fs::read_dir(sandbox)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "remote" && n != "local")
        .collect();
    if !beside.is_empty() {
        return Err(format!("files appeared outside the caches: {beside:?}"));
    }
    Ok(tags)
}

fn remote_case(seeds: Vec<Vec<u8>>, live: Live) -> impl Strategy<Value = RemoteCase> {
    let edited = edited(seeds.clone(), live.clone());
    let pool = seeds.clone();
    let seeds2 = seeds.clone();
    let mutated = (0..seeds.len(), mutations())
        .prop_map(move |(i, m)| mutate(&seeds[i], &m, &pool, JSON_TOKENS));
    let live2 = live.clone();
    let envelope = |manifest: Value, format: u8, compressed: u8, live: &Live| {
        let compressed: Vec<Value> = match compressed {
            0..=3 => Vec::new(),
            4 => live.blobs.iter().map(|(d, _)| json!(d)).collect(),
            5 => vec![json!("nothex")],
            _ => vec![json!(live.blobs[0].0)],
        };
        let format = [1, 1, 1, 0, 2][format as usize % 5];
        serde_json::to_vec(&json!({
            "format": format,
            "compressed": compressed,
            "manifest": manifest,
        }))
        .expect("json")
    };
    let structured =
        (gen_manifest(), 0..live.keys.len(), any::<u8>(), 0u8..7).prop_map(move |(g, k, f, c)| {
            let manifest = render_manifest(&g, &live, live.keys[k]);
            envelope(manifest, f, c, &live)
        });
    let structured_mutated = (
        gen_manifest(),
        0..live2.keys.len(),
        any::<u8>(),
        0u8..7,
        mutations(),
    )
        .prop_map(move |(g, k, f, c, m)| {
            let manifest = render_manifest(&g, &live2, live2.keys[k]);
            mutate(&envelope(manifest, f, c, &live2), &m, &seeds2, JSON_TOKENS)
        });
    (
        any::<usize>(),
        prop_oneof![4 => mutated, 4 => edited, 2 => structured, 1 => structured_mutated],
        blob_damage(),
        any::<bool>(),
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(entry, bytes, damage, pull, tight)| RemoteCase {
            entry,
            bytes,
            damage,
            pull,
            tight,
        })
}

#[test]
fn fuzz_remote_entries() {
    let fx = fixture();
    let (keys, _, live) = live_entries(&fx.cache);
    let pristine = snapshot(&fx.remote);
    let mut seeds: Vec<Vec<u8>> = pristine
        .iter()
        .filter(|(p, _)| p.starts_with("v1/actions"))
        .map(|(_, b)| b.clone())
        .collect();
    assert!(seeds.len() >= 3, "pushed entries: {}", seeds.len());
    assert!(
        pristine
            .keys()
            .any(|p| p.extension().is_some_and(|e| e == "zst")),
        "the remote has a compressed blob"
    );
    seeds.extend(
        read_dir_files(&repo().join("tests/fuzz/corpus/remote"), &["json"])
            .into_iter()
            .map(|(_, b)| b),
    );
    // Entries are written per input: the pristine remote keeps only blobs and `tmp/`.
    let pristine: BTreeMap<PathBuf, Vec<u8>> = pristine
        .into_iter()
        .filter(|(p, _)| !p.starts_with("v1/actions"))
        .collect();
    let strategy = remote_case(seeds, live);
    let report = fuzz(
        "remote",
        strategy,
        move || RemoteState {
            sandbox: sandbox(),
            pristine,
            keys,
        },
        remote_property,
    );
    assert_clean("remote", &report);
}
