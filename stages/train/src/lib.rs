//! The `train` and `eval` stage kinds: GPT-2 and BERT presets trained on a domain mixture and
//! validated per domain on fixed held-out sets.
//!
//! This crate never links libtorch. It owns everything `autoscale` needs to plan, key and launch
//! a training: params, jobs, the data format, mixture sampling, schedules, presets, and the
//! trainer's identity. The training itself runs in the `autoscale-train` binary
//! (`stages/trainer`), the one program of the workspace that links libtorch.
//!
//! | module | owns |
//! |---|---|
//! | [`data`] | token shards and JSONL corpora, the fixed held-out split |
//! | [`sampling`] | from a mixture to the exact sequence of training windows |
//! | [`masking`] | BERT's 15% / 80-10-10 corruption |
//! | [`schedule`] | warmup, then linear or cosine decay |
//! | [`preset`] | model configs, presets, Hugging Face `config.json` |
//! | [`spec`] | a job from a stage's params and inputs |
//! | [`kinds`] | the `train` and `eval` kinds and the child process |

pub mod data;
pub mod error;
pub mod kinds;
pub mod masking;
pub mod preset;
pub mod rng;
pub mod sampling;
pub mod schedule;
pub mod spec;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use autoscale_engine::StageKind;
use serde_json::Value;

pub use error::TrainError;
pub use kinds::{CHILD_SUBCOMMAND, ChildMessage, EvalKind, Launcher, TrainKind, die_with_parent};
pub use spec::{EvalSpec, Job, TrainSpec};

// One literal for both the constant and the identity below (`concat!` takes only literals).
macro_rules! libtorch_version {
    () => {
        "2.13.0"
    };
}

/// The trainer binary's file name.
pub const TRAINER_BINARY: &str = "autoscale-train";
/// Names the trainer binary explicitly, before the one next to `autoscale`.
pub const TRAINER_ENV: &str = "AUTOSCALE_TRAINER";
/// The libtorch the trainer links: the version tch 0.26 is built for.
pub const LIBTORCH_VERSION: &str = libtorch_version!();
/// How to build both binaries, for errors that find no trainer or the wrong one.
pub const BUILD_HINT: &str = "build both binaries from one checkout: `bash examples/demo.sh`, or \
python3 -m venv .venv && .venv/bin/pip install torch==2.13.0, then \
PATH=$PWD/.venv/bin:$PATH LIBTORCH_USE_PYTORCH=1 cargo build --release --workspace";

/// A digest of the trainer's sources, computed at build time (build.rs), so `autoscale` and
/// `autoscale-train` built from one checkout agree.
pub const TRAINER_CODE: &str = env!("AUTOSCALE_TRAINER_CODE");

/// What makes a training's result besides its params and data: the trainer's code and the
/// libtorch version it links. Part of every train/eval key; known without starting the trainer.
pub const TRAINER_IDENTITY: &str = concat!(
    "trainer ",
    env!("AUTOSCALE_TRAINER_CODE"),
    " libtorch ",
    libtorch_version!()
);

/// Where the trainer binary is: `$AUTOSCALE_TRAINER` when set, else `autoscale-train` next to
/// `exe` (the running `autoscale`). Only a `stat`; the trainer is not started.
pub fn find_trainer(exe: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(TRAINER_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let beside = exe?.parent()?.join(TRAINER_BINARY);
    beside.is_file().then_some(beside)
}

/// The kinds this crate provides, running their jobs with `launcher`.
pub fn kinds(launcher: Launcher) -> Vec<Arc<dyn StageKind>> {
    vec![
        Arc::new(TrainKind::new(launcher.clone())),
        Arc::new(EvalKind::new(launcher)),
    ]
}

/// Where a running job reports to.
pub struct JobHooks<'a> {
    /// Progress events: `{"step", "steps", "tokens", "loss", "lr", "tokens_per_s"}`, and curve
    /// points `{"step", "tokens", "eval": {"mean_loss", ...}}`.
    pub progress: &'a (dyn Fn(Value) + Sync),
    /// Human-readable log lines.
    pub log: &'a (dyn Fn(&str) + Sync),
    /// Set to stop at the next step; the last checkpoint stays for a rerun.
    pub cancel: &'a AtomicBool,
}

impl JobHooks<'_> {
    /// Logs a line.
    pub fn say(&self, line: &str) {
        (self.log)(line)
    }
}
