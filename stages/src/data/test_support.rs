//! Running a kind outside the engine, for the unit tests: temp directories for the outputs and
//! the scratch space, collected progress events.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use autoscale_engine::{InputPath, StageContext, StageError, StageKind};
use serde_json::{Map, Value};

pub(crate) struct Harness {
    pub dir: tempfile::TempDir,
    pub events: Mutex<Vec<Value>>,
    pub cancel: AtomicBool,
    runs: Mutex<u32>,
}

impl Harness {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            events: Mutex::new(Vec::new()),
            cancel: AtomicBool::new(false),
            runs: Mutex::new(0),
        }
    }

    /// Scratch space shared by every run of this harness, as it is for one key in the engine.
    pub fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }

    /// Runs `kind` with an empty output directory of its own; the directory and the value.
    pub fn run_inputs(
        &self,
        kind: &dyn StageKind,
        params: &Map<String, Value>,
        inputs: BTreeMap<String, InputPath>,
        stage_id: &str,
    ) -> Result<(PathBuf, Value), StageError> {
        kind.check(params).map_err(StageError::failed)?;
        let n = {
            let mut runs = self.runs.lock().expect("lock");
            *runs += 1;
            *runs
        };
        let out_dir = self.dir.path().join(format!("out-{n}"));
        std::fs::create_dir_all(&out_dir).expect("mkdir out");
        let env = BTreeMap::new();
        let progress = |v: Value| self.events.lock().expect("lock").push(v);
        let ctx = StageContext {
            stage_id,
            params,
            inputs: &inputs,
            out_dir: out_dir.clone(),
            scratch_dir: self.scratch(),
            work_dir: self.dir.path().to_path_buf(),
            log_path: self.dir.path().join(format!("log-{n}")),
            devices: None,
            env: &env,
            cancel: &self.cancel,
            progress: &progress,
            on_group: &|_| {},
        };
        let value = kind.run(&ctx)?;
        Ok((out_dir, value))
    }

    pub fn run(
        &self,
        kind: &dyn StageKind,
        params: &Map<String, Value>,
        inputs: &[(&str, PathBuf)],
    ) -> Result<PathBuf, StageError> {
        let inputs = inputs
            .iter()
            .map(|(n, p)| (n.to_string(), InputPath::One(p.clone())))
            .collect();
        self.run_inputs(kind, params, inputs, "stage")
            .map(|(out, _)| out)
    }

    /// [`Harness::run`], which must succeed.
    pub fn run_one(
        &self,
        kind: &dyn StageKind,
        params: &Map<String, Value>,
        inputs: &[(&str, PathBuf)],
    ) -> PathBuf {
        match self.run(kind, params, inputs) {
            Ok(out) => out,
            Err(e) => panic!("{} failed: {e:?}", kind.name()),
        }
    }
}

/// A file of the committed fixture corpus.
pub(crate) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/corpus")
        .join(name)
}

/// The `text` of every line of a JSON Lines file.
pub(crate) fn read_docs(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json line");
            v["text"].as_str().expect("text").to_string()
        })
        .collect()
}

/// `params` from a JSON object literal.
pub(crate) fn params(v: Value) -> Map<String, Value> {
    serde_json::from_value(v).expect("params map")
}
