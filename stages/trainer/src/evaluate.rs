//! Per-domain validation on the fixed held-out sets, and the `eval` job.
//!
//! A domain's held-out tokens are cut into windows of `seq_len + 1` at stride `seq_len` (one
//! shorter window when the whole set is shorter), and the first ones up to the token budget are
//! scored: GPT-2 on every next token, BERT on its masked tokens (masks drawn from a fixed seed,
//! the same for every run). Per domain: `loss` (mean nats per scored token), `ppl` = e^loss, and
//! `bpb` = total nats / ln 2 / bytes of the scored text (end-of-text targets cost nats, no
//! bytes).

use crate::TorchResult;
use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};

use crate::export;
use crate::model::{Batch, Model};
use autoscale_train::JobHooks;
use autoscale_train::data::{Corpus, Split};
use autoscale_train::error::TrainError;
use autoscale_train::preset::{Arch, ModelConfig};
use autoscale_train::rng::SplitMix64;
use autoscale_train::spec::{DeviceRequest, EvalSpec};

/// Validation masks do not depend on the run's seed: every run is scored on the same tokens.
const EVAL_MASK_SEED: u64 = 0x5eed_e7a1;

/// One domain's scored windows.
pub struct EvalSet {
    pub domain: String,
    /// `(start, tokens)` of each window.
    windows: Vec<(u64, u64)>,
    bytes_per_token: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DomainMetrics {
    pub loss: f64,
    pub ppl: f64,
    pub bpb: f64,
    /// Targets scored.
    pub tokens: i64,
}

/// The held-out windows of `domains`, at most `tokens` targets each.
pub fn eval_sets(
    corpus: &Corpus,
    domains: &[String],
    seq_len: u64,
    tokens: u64,
) -> Result<Vec<EvalSet>, TrainError> {
    domains
        .iter()
        .map(|d| {
            let val: &Split = &corpus.domain(d)?.val;
            let n = val.windows(seq_len);
            let windows: Vec<(u64, u64)> = if n == 0 {
                if val.tokens.len() < 2 {
                    return Err(TrainError::data(
                        &corpus.path,
                        format!("domain `{d}` has no held-out text to validate on"),
                    ));
                }
                vec![(0, val.tokens.len())]
            } else {
                let k = n.min(tokens.div_ceil(seq_len).max(1));
                (0..k).map(|i| (i * seq_len, seq_len + 1)).collect()
            };
            Ok(EvalSet {
                domain: d.clone(),
                windows,
                bytes_per_token: val.bytes_per_token(),
            })
        })
        .collect()
}

/// Scores `model` on each set (in no-grad, eval mode).
pub fn evaluate(
    model: &Model,
    corpus: &Corpus,
    sets: &[EvalSet],
    batch_size: u64,
) -> Result<BTreeMap<String, DomainMetrics>, TrainError> {
    let _guard = tch::no_grad_guard();
    let mut out = BTreeMap::new();
    for set in sets {
        let val = &corpus.domain(&set.domain)?.val;
        let (mut nats, mut count, mut text) = (0.0f64, 0i64, 0i64);
        for (chunk_index, chunk) in set.windows.chunks(batch_size.max(1) as usize).enumerate() {
            let mut windows = Vec::with_capacity(chunk.len());
            for &(start, len) in chunk {
                let mut w = vec![0i64; len as usize];
                val.tokens.read(start, &mut w)?;
                windows.push(w);
            }
            check_ids(&windows, &model.config, &set.domain)?;
            let (batch, non_eot) = match model.config.arch {
                Arch::Gpt2 => Batch::next_token(&windows, model.config.eot_token, model.device),
                Arch::Bert => {
                    let first = chunk_index * batch_size.max(1) as usize;
                    let domain = set.domain.as_bytes();
                    let Some(batch) = Batch::masked(
                        &windows,
                        &model.config,
                        |row| {
                            SplitMix64::for_stream(
                                EVAL_MASK_SEED,
                                &[b"eval", domain, &((first + row) as u64).to_le_bytes()],
                            )
                        },
                        model.device,
                    ) else {
                        continue;
                    };
                    let n = batch.count;
                    (batch, n)
                }
            };
            nats += model.loss_sum(&batch, false)?.f_double_value(&[]).torch()?;
            count += batch.count;
            text += non_eot;
        }
        if count == 0 {
            return Err(TrainError::data(
                &corpus.path,
                format!("domain `{}` has no held-out tokens to score", set.domain),
            ));
        }
        let loss = nats / count as f64;
        let bytes = (text as f64 * set.bytes_per_token).max(1.0);
        out.insert(
            set.domain.clone(),
            DomainMetrics {
                loss,
                ppl: loss.exp(),
                bpb: nats / std::f64::consts::LN_2 / bytes,
                tokens: count,
            },
        );
    }
    Ok(out)
}

/// Token ids past the model's vocabulary would index out of its embedding.
pub fn check_ids(
    windows: &[Vec<i64>],
    config: &ModelConfig,
    domain: &str,
) -> Result<(), TrainError> {
    if let Some(bad) = windows
        .iter()
        .flatten()
        .find(|&&t| t < 0 || t >= config.vocab_size)
    {
        return Err(TrainError::Data {
            path: domain.into(),
            message: format!(
                "token id {bad} is outside the vocabulary of {}",
                config.vocab_size
            ),
            hint: Some("the shards' `vocab_size` must cover every id they hold".into()),
        });
    }
    Ok(())
}

/// `eval.json`'s summary fields over the domains: mean loss, mean and worst perplexity.
pub fn summary(domains: &BTreeMap<String, DomainMetrics>) -> (f64, f64, f64) {
    let n = domains.len().max(1) as f64;
    let mean_loss = domains.values().map(|m| m.loss).sum::<f64>() / n;
    let mean_ppl = domains.values().map(|m| m.ppl).sum::<f64>() / n;
    let worst_ppl = domains.values().map(|m| m.ppl).fold(0.0, f64::max);
    (mean_loss, mean_ppl, worst_ppl)
}

/// `eval.json`: `{"domains": {d: {"loss", "ppl", "bpb", "tokens"}}, "mean_loss", "mean_ppl",
/// "worst_ppl", "curve": [...], "train": {...}}`.
pub fn eval_json(
    domains: &BTreeMap<String, DomainMetrics>,
    curve: Vec<Value>,
    train: Value,
) -> Value {
    let (mean_loss, mean_ppl, worst_ppl) = summary(domains);
    json!({
        "domains": domains,
        "mean_loss": mean_loss,
        "mean_ppl": mean_ppl,
        "worst_ppl": worst_ppl,
        "curve": curve,
        "train": train,
    })
}

pub fn write_json(path: &std::path::Path, value: &Value) -> Result<(), TrainError> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(value).unwrap_or_default() + "\n";
    std::fs::write(&tmp, text).map_err(|e| TrainError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io("rename into place", path, e))
}

/// The first device of [`devices`]: where an `eval` job runs.
pub fn device(request: DeviceRequest) -> Result<tch::Device, TrainError> {
    Ok(devices(request)?[0])
}

/// The devices a job was given: the CPU, or every CUDA device the process sees (the kind pins
/// the stage's devices with `CUDA_VISIBLE_DEVICES`).
pub fn devices(request: DeviceRequest) -> Result<Vec<tch::Device>, TrainError> {
    match request {
        DeviceRequest::Cpu => Ok(vec![tch::Device::Cpu]),
        DeviceRequest::Cuda => {
            if tch::Cuda::is_available() {
                let n = tch::Cuda::device_count().max(1);
                Ok((0..n as usize).map(tch::Device::Cuda).collect())
            } else {
                Err(TrainError::Torch {
                    message: format!(
                        "the stage was assigned CUDA devices ({}), but libtorch sees none",
                        std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
                    ),
                    hint: Some(
                        "run `autoscale doctor`; a build without a CUDA libtorch, or without the driver, cannot use them (or run with --gpus none)"
                            .into(),
                    ),
                })
            }
        }
    }
}

pub fn set_threads(threads: Option<usize>) {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    tch::set_num_threads(n as i32);
}

/// The `eval` job: loads an exported model and scores it on any domains.
pub fn eval_job(spec: &EvalSpec, hooks: &JobHooks<'_>) -> Result<Value, TrainError> {
    set_threads(spec.threads);
    let device = device(spec.device)?;
    let saved = export::read_info(&spec.model_dir)?;
    let corpus = Corpus::open(&spec.data, spec.held_out, spec.domains.as_deref())?;
    let domains: Vec<String> = match &spec.domains {
        Some(d) => d.clone(),
        None => corpus.domains.keys().cloned().collect(),
    };
    if corpus.vocab.size > saved.config.vocab_size {
        return Err(TrainError::Data {
            path: spec.data.clone(),
            message: format!(
                "the data's vocabulary ({} ids) is larger than the model's ({})",
                corpus.vocab.size, saved.config.vocab_size
            ),
            hint: Some("evaluate on data tokenized like the training data".into()),
        });
    }
    let seq_len = spec.seq_len.unwrap_or(saved.seq_len);
    if seq_len as i64 > saved.config.n_positions {
        return Err(TrainError::param(
            "seq_len",
            format!(
                "{seq_len} is longer than the model's {} positions",
                saved.config.n_positions
            ),
        ));
    }
    let model = export::load(&spec.model_dir, &saved.config, device)?;
    hooks.say(&format!(
        "evaluating {} ({} parameters) on {} domains",
        saved.config.preset,
        saved.config.parameter_count(),
        domains.len()
    ));
    let sets = eval_sets(&corpus, &domains, seq_len, spec.tokens)?;
    let metrics = evaluate(&model, &corpus, &sets, spec.batch_size)?;
    for (d, m) in &metrics {
        hooks.say(&format!(
            "  {d}: loss {:.4}  ppl {:.3}  bpb {:.4}",
            m.loss, m.ppl, m.bpb
        ));
    }
    let train =
        json!({"model": saved.config.preset, "from": spec.model_dir, "trained": saved.train});
    let value = eval_json(&metrics, Vec::new(), train);
    write_json(&spec.out_dir.join("eval.json"), &value)?;
    Ok(json!({
        "mean_loss": value["mean_loss"],
        "mean_ppl": value["mean_ppl"],
        "worst_ppl": value["worst_ppl"],
        "domains": domains,
    }))
}
