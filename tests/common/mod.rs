//! Shared helpers for the CLI integration tests: a scratch workspace with its own cache, and
//! the binary run against it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The trainer binary next to `autoscale`: `cargo test --workspace` builds it, with libtorch
/// (LIBTORCH_USE_PYTORCH=1, as tests/run.sh does). Without it, tests that train say so and
/// return, unless AUTOSCALE_REQUIRE_TRAINER=1 (tests/run.sh, CI), which fails them.
pub fn trainer() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_BIN_EXE_autoscale")).with_file_name("autoscale-train");
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("AUTOSCALE_REQUIRE_TRAINER").is_none(),
        "AUTOSCALE_REQUIRE_TRAINER is set but `{}` was not built: run `cargo test --workspace` with LIBTORCH_USE_PYTORCH=1",
        path.display()
    );
    eprintln!(
        "skipped: no trainer at {} (build with `cargo test --workspace`, LIBTORCH_USE_PYTORCH=1)",
        path.display()
    );
    None
}

pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cache(&self) -> PathBuf {
        self.path().join("cache")
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&path, text).expect("write");
        path
    }

    /// The binary with this workspace's cache, run in the workspace.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_autoscale"));
        cmd.args(args)
            .current_dir(self.path())
            .env("AUTOSCALE_CACHE_DIR", self.cache())
            .env_remove("AUTOSCALE_TRAINER")
            .env_remove("CUDA_VISIBLE_DEVICES");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run autoscale")
    }

    /// `autoscale --json run ARGS`, returning the exit code and the events.
    pub fn run_json(&self, args: &[&str]) -> (i32, Vec<Value>) {
        let mut all = vec!["--json", "run"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        (out.status.code().unwrap_or(-1), events(&out))
    }
}

pub fn events(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Stage ids with the given outcome, sorted.
pub fn with_outcome(events: &[Value], outcome: &str) -> Vec<String> {
    let mut ids: Vec<String> = events
        .iter()
        .filter(|e| e["event"] == "finished" && e["outcome"] == outcome)
        .filter_map(|e| e["stage"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `command` pipeline of `n` stages with `resources: {gpus: 1}`, each recording into
/// `trace/<i>` when it started, the `CUDA_VISIBLE_DEVICES` it saw and when it ended, with a
/// sleep of `seconds` between.
pub fn gpu_trace_pipeline(trace: &Path, n: usize, seconds: f64) -> String {
    let items: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    format!(
        r#"
name: gpus
stages:
  - id: train
    kind: command
    foreach: [{items}]
    resources: {{gpus: 1}}
    cmd: "echo start $(date +%s%N) $CUDA_VISIBLE_DEVICES > {t}/${{item}}; sleep {seconds}; echo end $(date +%s%N) >> {t}/${{item}}; echo ${{item}} > $AUTOSCALE_OUT/x"
"#,
        items = items.join(", "),
        t = trace.display()
    )
}

/// `(start, end, device)` of each of the `n` stages of [`gpu_trace_pipeline`]; panics if two
/// stages that ran at the same time saw the same device.
pub fn gpu_spans(trace: &Path, n: usize) -> Vec<(u128, u128, String)> {
    let mut spans = Vec::new();
    for i in 0..n {
        let text = std::fs::read_to_string(trace.join(i.to_string())).expect("trace");
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(words.len(), 5, "start, one device, end: {text:?}");
        let start: u128 = words[1].parse().expect("start");
        let end: u128 = words[4].parse().expect("end");
        spans.push((start, end, words[2].to_string()));
    }
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            assert!(
                !(a.0 < b.1 && b.0 < a.1 && a.2 == b.2),
                "two stages at once on device {}: {spans:?}",
                a.2
            );
        }
    }
    spans
}
