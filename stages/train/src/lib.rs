//! The `train` and `eval` stage kinds: GPT-2 and BERT presets trained on libtorch (through tch)
//! on a domain mixture, validated per domain on fixed held-out sets.
//!
//! This is the one crate of the workspace that knows libtorch, and only behind its `torch`
//! feature. Without it the data format, mixture sampling, schedules, presets, params and the
//! stage kinds themselves (which run the training in a child process) build and test without
//! libtorch; with it, [`run_job`] trains and evaluates.
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
//! | `model`, `trainer`, `evaluate`, `checkpoint`, `export` (feature `torch`) | the libtorch side |

pub mod data;
pub mod error;
pub mod kinds;
pub mod masking;
pub mod preset;
pub mod rng;
pub mod sampling;
pub mod schedule;
pub mod spec;

#[cfg(feature = "torch")]
mod checkpoint;
#[cfg(feature = "torch")]
mod doctor;
#[cfg(feature = "torch")]
mod evaluate;
#[cfg(feature = "torch")]
mod export;
#[cfg(feature = "torch")]
pub mod model;
#[cfg(feature = "torch")]
mod optim;
#[cfg(feature = "torch")]
mod safetensors;
#[cfg(feature = "torch")]
mod trainer;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use autoscale_engine::StageKind;
use serde_json::Value;

pub use error::TrainError;
pub use kinds::{CHILD_SUBCOMMAND, ChildMessage, EvalKind, Launcher, TrainKind, die_with_parent};
pub use spec::{EvalSpec, Job, TrainSpec};

#[cfg(feature = "torch")]
pub use doctor::{TorchInfo, torch_info};

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

/// Runs a job in this process: trains (resuming from a checkpoint in its scratch directory) or
/// evaluates, and writes the outputs. Returns the stage's result summary.
#[cfg(feature = "torch")]
pub fn run_job(job: &Job, hooks: &JobHooks<'_>) -> Result<Value, TrainError> {
    // libtorch reports some errors by panicking through tch; they become errors here.
    let run = std::panic::AssertUnwindSafe(|| match job {
        Job::Train(spec) => trainer::train(spec, hooks),
        Job::Eval(spec) => evaluate::eval_job(spec, hooks),
    });
    match std::panic::catch_unwind(run) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "an unknown failure".into());
            Err(TrainError::torch(message))
        }
    }
}
