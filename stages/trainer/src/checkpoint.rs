//! Checkpoints in the stage's scratch directory, which survives a killed run: a rerun of the
//! same stage resumes from the last one.
//!
//! ```text
//! <scratch>/checkpoint.json                  what the last checkpoint is (written last)
//! <scratch>/checkpoint-000120.safetensors    parameters (`p.`), AdamW moments (`m.`, `v.`)
//! ```
//!
//! The tensors are written to a temp file, synced and renamed, then `checkpoint.json` is
//! replaced the same way, then older tensor files are removed: a kill at any point leaves the
//! previous checkpoint or the new one, never half of one. The `fingerprint` (everything that
//! shapes the training) must match for a checkpoint to be used.

use crate::TorchResult;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::Params;
use crate::optim::AdamW;
use crate::safetensors;
use autoscale_train::error::TrainError;

const INDEX: &str = "checkpoint.json";

/// What `checkpoint.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointIndex {
    pub version: u32,
    pub fingerprint: String,
    /// Optimizer steps done.
    pub step: u64,
    pub file: String,
    /// Curve points so far.
    pub curve: Vec<Value>,
    /// The last steps' training losses.
    pub recent_losses: Vec<f64>,
    /// Training seconds so far, over every attempt.
    pub train_seconds: f64,
}

/// The last usable checkpoint, if any. One with another fingerprint is ignored (and said so).
pub fn latest(scratch: &Path, fingerprint: &str, log: &dyn Fn(&str)) -> Option<CheckpointIndex> {
    let path = scratch.join(INDEX);
    let text = std::fs::read_to_string(&path).ok()?;
    let index: CheckpointIndex = match serde_json::from_str(&text) {
        Ok(i) => i,
        Err(e) => {
            log(&format!(
                "ignoring unreadable checkpoint {}: {e}",
                path.display()
            ));
            return None;
        }
    };
    if index.version != 1 || index.fingerprint != fingerprint {
        log("ignoring a checkpoint of a different training");
        return None;
    }
    if !scratch.join(&index.file).is_file() {
        log(&format!(
            "ignoring checkpoint {}: its tensors are gone",
            index.file
        ));
        return None;
    }
    Some(index)
}

/// Restores parameters and optimizer state.
pub fn load(
    scratch: &Path,
    index: &CheckpointIndex,
    params: &mut Params,
    opt: &mut AdamW,
) -> Result<(), TrainError> {
    let path = scratch.join(&index.file);
    let tensors = safetensors::read(&path)?;
    let mut p = Vec::new();
    let mut m = Vec::new();
    let mut v = Vec::new();
    for (name, t) in tensors {
        if let Some(n) = name.strip_prefix("p.") {
            p.push((n.to_string(), t));
        } else if let Some(n) = name.strip_prefix("m.") {
            m.push((n.to_string(), t));
        } else if let Some(n) = name.strip_prefix("v.") {
            v.push((n.to_string(), t));
        }
    }
    let what = path.display().to_string();
    params.load(p, &what)?;
    let by_name = |list: &mut Vec<(String, tch::Tensor)>, name: &str| {
        list.iter()
            .position(|(n, _)| n == name)
            .map(|i| list.swap_remove(i).1)
            .ok_or_else(|| TrainError::torch(format!("{what} has no optimizer state for `{name}`")))
    };
    let _guard = tch::no_grad_guard();
    for ((name, _), s) in params.tensors.iter().zip(&mut opt.state) {
        s.m.f_copy_(&by_name(&mut m, name)?).torch()?;
        s.v.f_copy_(&by_name(&mut v, name)?).torch()?;
    }
    opt.t = index.step;
    Ok(())
}

/// Writes a checkpoint after `index.step` steps and drops older ones.
pub fn save(
    scratch: &Path,
    mut index: CheckpointIndex,
    params: &Params,
    opt: &AdamW,
) -> Result<(), TrainError> {
    index.file = format!("checkpoint-{:06}.safetensors", index.step);
    let mut tensors = Vec::with_capacity(3 * params.tensors.len());
    for ((name, p), s) in params.tensors.iter().zip(&opt.state) {
        tensors.push((format!("p.{name}"), p.detach()));
        tensors.push((format!("m.{name}"), s.m.shallow_clone()));
        tensors.push((format!("v.{name}"), s.v.shallow_clone()));
    }
    safetensors::write(&scratch.join(&index.file), &tensors)?;
    let path = scratch.join(INDEX);
    let tmp = scratch.join("checkpoint.json.tmp");
    let text = serde_json::to_string_pretty(&index).unwrap_or_default();
    std::fs::write(&tmp, text).map_err(|e| TrainError::io("write", &tmp, e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainError::io("sync", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| TrainError::io("rename into place", &path, e))?;
    for old in older_files(scratch, &index.file) {
        let _ = std::fs::remove_file(old);
    }
    Ok(())
}

fn older_files(scratch: &Path, keep: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("checkpoint-") && n != keep)
        })
        .collect()
}
