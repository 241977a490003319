//! A trained model as a Hugging Face model directory:
//!
//! ```text
//! model/model.safetensors   the parameters, Hugging Face names (tied weights stored once)
//! model/config.json         GPT2LMHeadModel / BertForMaskedLM config: `from_pretrained("model")`
//! model/autoscale.json      our config, the sequence length and tokenizer, the training summary
//! model/sample.json         a held-out batch in Hugging Face's convention (`input_ids`,
//!                           `labels`) and our fp32 loss on it, to check a loader against
//! ```

use crate::TorchResult;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tch::{Device, Kind};

use crate::evaluate::write_json;
use crate::model::{Batch, Model, Targets};
use crate::safetensors;
use autoscale_train::data::Vocabulary;
use autoscale_train::error::TrainError;
use autoscale_train::preset::{Arch, ModelConfig};
use autoscale_train::rng::SplitMix64;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub config: ModelConfig,
    pub seq_len: u64,
    pub vocab: Vocabulary,
    #[serde(default)]
    pub train: Value,
}

/// `windows`: a few held-out windows of `seq_len + 1` tokens for `sample.json`.
pub fn save(
    dir: &Path,
    model: &Model,
    info: &ModelInfo,
    windows: &[Vec<i64>],
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io("create", dir, e))?;
    let tensors: Vec<(String, tch::Tensor)> = model
        .params
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.detach()))
        .collect();
    safetensors::write(&dir.join("model.safetensors"), &tensors)?;
    write_json(&dir.join("config.json"), &model.config.hf_config())?;
    write_json(
        &dir.join("autoscale.json"),
        &serde_json::to_value(info).unwrap_or_default(),
    )?;
    if let Some(sample) = sample(model, windows)? {
        write_json(&dir.join("sample.json"), &sample)?;
    }
    Ok(())
}

/// A batch as `transformers` takes it, with our loss on it in fp32.
fn sample(model: &Model, windows: &[Vec<i64>]) -> Result<Option<Value>, TrainError> {
    if windows.is_empty() {
        return Ok(None);
    }
    let _guard = tch::no_grad_guard();
    let config = &model.config;
    let (batch, input_ids, labels) = match config.arch {
        Arch::Gpt2 => {
            // transformers shifts the labels itself: input_ids = labels = the first `seq` tokens,
            // which is our batch over the window without its last token.
            let short: Vec<Vec<i64>> = windows.iter().map(|w| w[..w.len() - 1].to_vec()).collect();
            let (batch, _) = Batch::next_token(&short, config.eot_token, model.device);
            (batch, short.clone(), short)
        }
        Arch::Bert => {
            let Some(batch) = Batch::masked(
                windows,
                config,
                |row| SplitMix64::for_stream(0, &[b"sample", &(row as u64).to_le_bytes()]),
                model.device,
            ) else {
                return Ok(None);
            };
            let t = windows[0].len() - 1;
            let flat =
                Vec::<i64>::try_from(batch.inputs.view([-1]).to_device(Device::Cpu)).torch()?;
            let input_ids: Vec<Vec<i64>> = flat.chunks(t).map(<[i64]>::to_vec).collect();
            let mut labels = vec![vec![-100i64; t]; windows.len()];
            if let Targets::Masked { positions, ids } = &batch.targets {
                let positions = Vec::<i64>::try_from(positions.to_device(Device::Cpu)).torch()?;
                let ids = Vec::<i64>::try_from(ids.to_device(Device::Cpu)).torch()?;
                for (p, id) in positions.into_iter().zip(ids) {
                    labels[p as usize / t][p as usize % t] = id;
                }
            }
            (batch, input_ids, labels)
        }
    };
    let loss = model
        .loss_sum_in(&batch, false, Kind::Float)?
        .f_double_value(&[])
        .torch()?
        / batch.count as f64;
    Ok(Some(json!({
        "arch": config.arch,
        "input_ids": input_ids,
        "labels": labels,
        "loss": loss,
    })))
}

pub fn read_info(dir: &Path) -> Result<ModelInfo, TrainError> {
    let path = dir.join("autoscale.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::Input {
        input: "model",
        message: format!("cannot read `{}`: {e}", path.display()),
        hint: Some("`model` is a train stage's output (or its model/ directory)".into()),
    })?;
    serde_json::from_str(&text)
        .map_err(|e| TrainError::data(&path, format!("not a model description: {e}")))
}

/// The exported model, ready to evaluate.
pub fn load(dir: &Path, config: &ModelConfig, device: Device) -> Result<Model, TrainError> {
    let mut model = Model::empty(config, device);
    let path = dir.join("model.safetensors");
    model
        .params
        .load(safetensors::read(&path)?, &path.display().to_string())?;
    Ok(model)
}
