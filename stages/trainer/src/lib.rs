//! The libtorch side of the `train` and `eval` kinds, behind the `autoscale-train` binary: GPT-2
//! and BERT on tch, AdamW, checkpoints, per-domain evaluation and the Hugging Face export.
//!
//! This is the one crate of the workspace that links libtorch. `autoscale` never depends on it,
//! so no feature flag and no `cargo build --workspace` can put libtorch into `autoscale`: the
//! kinds (in `autoscale-train`) start this crate's binary for each job.
//!
//! | module | owns |
//! |---|---|
//! | [`model`] | GPT-2 and BERT on tch |
//! | `trainer`, `optim`, `checkpoint` | the training loop, AdamW, resumable checkpoints |
//! | `evaluate`, `export`, `safetensors` | per-domain held-out loss, the Hugging Face export |
//! | `doctor` | what libtorch this process runs on |

mod checkpoint;
mod doctor;
mod evaluate;
mod export;
pub mod model;
mod optim;
mod safetensors;
mod torch_version;
mod trainer;

use autoscale_train::{Job, JobHooks, TrainError};
use serde_json::Value;

pub use doctor::{TorchInfo, torch_info};

/// The libtorch this binary was linked against, read at build time from the wheel's
/// `version.py` (or libtorch's `build-version`): `2.13.0+cu130`, say.
pub const LINKED_LIBTORCH: Option<&str> = option_env!("AUTOSCALE_LINKED_LIBTORCH");

/// This binary's trainer identity: the code digest it shares with `autoscale` and the version of
/// the libtorch it actually links. Equal to [`autoscale_train::TRAINER_IDENTITY`] unless the
/// binary was built against another libtorch than tch expects.
pub fn identity() -> String {
    let linked = LINKED_LIBTORCH
        .map(|v| v.split('+').next().unwrap_or(v))
        .unwrap_or("unknown");
    format!(
        "trainer {} libtorch {linked}",
        autoscale_train::TRAINER_CODE
    )
}

/// Errors of tch calls, as a [`TrainError`] (the orphan rule forbids a `From` here).
pub(crate) trait TorchResult<T> {
    fn torch(self) -> Result<T, TrainError>;
}

impl<T> TorchResult<T> for Result<T, tch::TchError> {
    fn torch(self) -> Result<T, TrainError> {
        self.map_err(|e| TrainError::torch(e.to_string()))
    }
}

/// Runs a job in this process: trains (resuming from a checkpoint in its scratch directory) or
/// evaluates, and writes the outputs. Returns the stage's result summary.
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
