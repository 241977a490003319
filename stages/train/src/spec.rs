//! A training or evaluation job, resolved from a stage's params and inputs. The `train` kind
//! writes it as JSON for the trainer binary (`autoscale-train job JOB.json`), which runs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::data::HeldOut;
use crate::error::TrainError;
use crate::preset::{ModelConfig, PRESETS};
use crate::sampling::MixtureRequest;
use crate::schedule::Decay;

/// Where a job runs. `Cuda` means the first device the process sees: the kind pins it with
/// `CUDA_VISIBLE_DEVICES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceRequest {
    Cpu,
    Cuda,
}

/// How the mixture was asked for, as the job file carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixtureSpec {
    Tokens(BTreeMap<String, f64>),
    Weights {
        weights: BTreeMap<String, f64>,
        total_tokens: f64,
    },
}

impl MixtureSpec {
    pub fn request(&self) -> MixtureRequest {
        match self {
            MixtureSpec::Tokens(t) => MixtureRequest::Tokens(t.clone()),
            MixtureSpec::Weights {
                weights,
                total_tokens,
            } => MixtureRequest::Weights {
                weights: weights.clone(),
                total_tokens: *total_tokens,
            },
        }
    }
}

/// Validation during and after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalOptions {
    /// Domains to evaluate (default: every domain of the data, in or out of the mixture).
    pub domains: Option<Vec<String>>,
    /// Held-out tokens scored per domain at the end.
    pub tokens: u64,
    /// Held-out tokens scored per domain at each point of the curve.
    pub curve_tokens: u64,
    /// Steps between curve points (`None`: ten points; 0: no curve).
    pub every: Option<u64>,
}

/// Everything one training needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    pub data: PathBuf,
    pub out_dir: PathBuf,
    pub scratch_dir: PathBuf,
    pub device: DeviceRequest,
    pub model: String,
    pub model_overrides: Map<String, Value>,
    pub dropout: f64,
    pub mixture: MixtureSpec,
    pub epochs: u32,
    /// Tokens per training sequence (default: the preset's context).
    pub seq_len: Option<u64>,
    pub batch_size: u64,
    pub grad_accum: u64,
    pub lr: f64,
    pub min_lr: f64,
    /// Fraction of the steps spent warming up.
    pub warmup: f64,
    pub schedule: Decay,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    pub seed: u64,
    /// Seeds the data draw when set; `seed` otherwise. Replicates that share `seed` and differ
    /// here share an initialisation, so their spread is the data draw's noise alone.
    pub data_seed: Option<u64>,
    /// Data-parallel replicas (`None`: one per device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u64>,
    pub eval: EvalOptions,
    /// Steps between checkpoints (`None`: twenty per run).
    pub checkpoint_every: Option<u64>,
    /// Also checkpoint when this long has passed since the last one.
    pub checkpoint_minutes: f64,
    /// Steps between progress events (`None`: a hundred per run).
    pub log_every: Option<u64>,
    /// CPU threads (`None`: every core).
    pub threads: Option<usize>,
    pub held_out: HeldOut,
}

/// Everything one evaluation of a trained model needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSpec {
    pub data: PathBuf,
    /// A directory with `autoscale.json`, `config.json` and `model.safetensors`.
    pub model_dir: PathBuf,
    pub out_dir: PathBuf,
    pub device: DeviceRequest,
    pub domains: Option<Vec<String>>,
    pub tokens: u64,
    pub batch_size: u64,
    pub seq_len: Option<u64>,
    pub threads: Option<usize>,
    pub held_out: HeldOut,
}

/// What the child process runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Job {
    Train(Box<TrainSpec>),
    Eval(Box<EvalSpec>),
}

impl Job {
    pub fn read(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io("read", path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| TrainError::data(path, format!("not a training job: {e}")))
    }
}

// ---------------------------------------------------------------------------------------------
// params

fn present<'a>(params: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    params.get(name).filter(|v| !v.is_null())
}

pub(crate) fn float(
    params: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<f64>, TrainError> {
    match present(params, name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| TrainError::param(name, format!("`{v}` is not a number"))),
    }
}

pub(crate) fn count(
    params: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<u64>, TrainError> {
    match present(params, name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| TrainError::param(name, format!("`{v}` is not a whole number ≥ 0"))),
    }
}

/// An optional count that must be at least 1 when given.
fn nonzero(params: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, TrainError> {
    match count(params, name)? {
        Some(0) => Err(TrainError::param(name, "must be at least 1")),
        other => Ok(other),
    }
}

fn positive(
    params: &Map<String, Value>,
    name: &'static str,
    default: u64,
) -> Result<u64, TrainError> {
    Ok(nonzero(params, name)?.unwrap_or(default))
}

fn string<'a>(
    params: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, TrainError> {
    match present(params, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(TrainError::param(name, format!("`{v}` is not a string"))),
    }
}

pub(crate) fn float_map(
    params: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<BTreeMap<String, f64>>, TrainError> {
    match present(params, name) {
        None => Ok(None),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                v.as_f64()
                    .map(|x| (k.clone(), x))
                    .ok_or_else(|| TrainError::param(name, format!("`{k}: {v}` is not a number")))
            })
            .collect::<Result<_, _>>()
            .map(Some),
        Some(v) => Err(TrainError::param(
            name,
            format!("`{v}` is not a map of domain to number"),
        )),
    }
}

fn strings(
    params: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<Vec<String>>, TrainError> {
    match present(params, name) {
        None => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| TrainError::param(name, format!("`{v}` is not a string")))
            })
            .collect::<Result<_, _>>()
            .map(Some),
        Some(v) => Err(TrainError::param(name, format!("`{v}` is not a list"))),
    }
}

fn fraction(
    params: &Map<String, Value>,
    name: &'static str,
    default: f64,
) -> Result<f64, TrainError> {
    let x = float(params, name)?.unwrap_or(default);
    if (0.0..=1.0).contains(&x) {
        Ok(x)
    } else {
        Err(TrainError::param(name, format!("{x} is not in [0, 1]")))
    }
}

fn non_negative(
    params: &Map<String, Value>,
    name: &'static str,
    default: f64,
) -> Result<f64, TrainError> {
    let x = float(params, name)?.unwrap_or(default);
    if x >= 0.0 {
        Ok(x)
    } else {
        Err(TrainError::param(name, format!("{x} is negative")))
    }
}

fn held_out(params: &Map<String, Value>) -> Result<HeldOut, TrainError> {
    let d = HeldOut::default();
    let val_fraction = fraction(params, "val_fraction", d.val_fraction)?;
    let val_docs = positive(params, "val_docs", d.val_docs as u64)? as usize;
    Ok(HeldOut {
        val_fraction,
        val_docs,
    })
}

fn model_name(params: &Map<String, Value>) -> Result<String, TrainError> {
    let name = string(params, "model")?.unwrap_or("gpt2-tiny");
    if !PRESETS.contains(&name) {
        return Err(TrainError::param_hint(
            "model",
            format!("unknown model preset `{name}`"),
            format!("use one of {}", PRESETS.join(", ")),
        ));
    }
    Ok(name.to_string())
}

/// The mixture from params, else from a weights file (`{"weights": {...}, "total_tokens": n}`,
/// any `weights.json` the mixture kinds write). `tokens` wins over `weights`: DDO's fan-out
/// children carry both, and the quantities are the exact ones.
pub fn mixture(
    params: &Map<String, Value>,
    weights_file: Option<&Path>,
) -> Result<Option<MixtureSpec>, TrainError> {
    if let Some(tokens) = float_map(params, "tokens")? {
        return Ok(Some(MixtureSpec::Tokens(tokens)));
    }
    let mut total = float(params, "total_tokens")?;
    let mut weights = float_map(params, "weights")?;
    if weights.is_none()
        && let Some(path) = weights_file
    {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io("read", path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| TrainError::data(path, format!("not JSON: {e}")))?;
        let file_weights = value["weights"]
            .as_object()
            .ok_or_else(|| TrainError::Data {
                path: path.to_path_buf(),
                message: "has no `weights` map".into(),
                hint: Some(r#"a weights file reads {"weights": {"books": 0.3, ...}}"#.into()),
            })?;
        let mut map = BTreeMap::new();
        for (k, v) in file_weights {
            let w = v.as_f64().ok_or_else(|| {
                TrainError::data(path, format!("weight `{k}: {v}` is not a number"))
            })?;
            map.insert(k.clone(), w);
        }
        weights = Some(map);
        total = total.or(value["total_tokens"].as_f64());
    }
    match (weights, total) {
        (Some(weights), Some(total_tokens)) => Ok(Some(MixtureSpec::Weights {
            weights,
            total_tokens,
        })),
        (Some(_), None) => Err(TrainError::param_hint(
            "total_tokens",
            "`weights` need a total",
            "set `total_tokens`, the training tokens of one pass",
        )),
        (None, Some(_)) => Err(TrainError::param_hint(
            "weights",
            "`total_tokens` needs weights to split it",
            "set `weights: {domain: w}` or give a `weights` input (a weights.json)",
        )),
        (None, None) => Ok(None),
    }
}

/// The train kind's params, checked without the data.
pub fn train_spec(
    params: &Map<String, Value>,
    data: PathBuf,
    weights_file: Option<&Path>,
    out_dir: PathBuf,
    scratch_dir: PathBuf,
    device: DeviceRequest,
) -> Result<TrainSpec, TrainError> {
    let model = model_name(params)?;
    let model_overrides = match present(params, "model_overrides") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(v) => {
            return Err(TrainError::param(
                "model_overrides",
                format!("`{v}` is not a map"),
            ));
        }
    };
    // Catch bad overrides now rather than in the child.
    ModelConfig::preset(&model, 257, 256, None)?.with_overrides(&model_overrides)?;
    let mixture = mixture(params, weights_file)?.ok_or_else(|| {
        TrainError::param_hint(
            "tokens",
            "no mixture given",
            "set `tokens: {domain: n}`, or `weights` and `total_tokens`, or a `weights` input",
        )
    })?;
    mixture.request().quantities()?;
    let schedule = match string(params, "schedule")? {
        None => Decay::Linear,
        Some(name) => Decay::parse(name).ok_or_else(|| {
            TrainError::param_hint(
                "schedule",
                format!("unknown schedule `{name}`"),
                "use `linear` or `cosine`",
            )
        })?,
    };
    let lr = non_negative(params, "lr", 2e-4)?;
    let min_lr = non_negative(params, "min_lr", 0.0)?;
    if min_lr > lr {
        return Err(TrainError::param(
            "min_lr",
            format!("{min_lr} is above `lr` ({lr})"),
        ));
    }
    let epochs = positive(params, "epochs", 1)?;
    let epochs = u32::try_from(epochs)
        .map_err(|_| TrainError::param("epochs", format!("{epochs} is too many")))?;
    let seq_len = nonzero(params, "seq_len")?;
    let eval_tokens = positive(params, "eval_tokens", 16_384)?;
    Ok(TrainSpec {
        data,
        out_dir,
        scratch_dir,
        device,
        model,
        model_overrides,
        dropout: fraction(params, "dropout", 0.0)?,
        mixture,
        epochs,
        seq_len,
        batch_size: positive(params, "batch_size", 8)?,
        grad_accum: positive(params, "grad_accum", 1)?,
        lr,
        min_lr,
        warmup: fraction(params, "warmup", 0.1)?,
        schedule,
        weight_decay: non_negative(params, "weight_decay", 0.01)?,
        grad_clip: non_negative(params, "grad_clip", 1.0)?,
        beta1: 0.9,
        beta2: 0.999,
        adam_eps: 1e-8,
        seed: count(params, "seed")?.unwrap_or(0),
        data_seed: count(params, "data_seed")?,
        replicas: nonzero(params, "replicas")?,
        eval: EvalOptions {
            domains: strings(params, "eval_domains")?,
            tokens: eval_tokens,
            curve_tokens: positive(params, "curve_tokens", 2048)?.min(eval_tokens),
            every: count(params, "eval_every")?,
        },
        checkpoint_every: nonzero(params, "checkpoint_every")?,
        checkpoint_minutes: match float(params, "checkpoint_minutes")? {
            Some(m) if m <= 0.0 => {
                return Err(TrainError::param("checkpoint_minutes", "must be positive"));
            }
            Some(m) => m,
            None => 30.0,
        },
        log_every: nonzero(params, "log_every")?,
        threads: nonzero(params, "threads")?.map(|n| n as usize),
        held_out: held_out(params)?,
    })
}

/// The eval kind's params, checked without the data.
pub fn eval_spec(
    params: &Map<String, Value>,
    data: PathBuf,
    model_dir: PathBuf,
    out_dir: PathBuf,
    device: DeviceRequest,
) -> Result<EvalSpec, TrainError> {
    Ok(EvalSpec {
        data,
        model_dir,
        out_dir,
        device,
        domains: strings(params, "domains")?,
        tokens: positive(params, "eval_tokens", 16_384)?,
        batch_size: positive(params, "batch_size", 8)?,
        seq_len: nonzero(params, "seq_len")?,
        threads: nonzero(params, "threads")?.map(|n| n as usize),
        held_out: held_out(params)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use autoscale_errors::Hint;
    use serde_json::json;

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn spec(v: Value) -> Result<TrainSpec, TrainError> {
        train_spec(
            &params(v),
            "data".into(),
            None,
            "out".into(),
            "scratch".into(),
            DeviceRequest::Cpu,
        )
    }

    #[test]
    fn defaults_follow_the_paper() {
        let s = spec(json!({"tokens": {"books": 1000}})).unwrap();
        assert_eq!(s.model, "gpt2-tiny");
        assert_eq!((s.lr, s.warmup, s.weight_decay), (2e-4, 0.1, 0.01));
        assert_eq!(s.schedule, Decay::Linear);
        assert_eq!(s.epochs, 1);
        assert_eq!((s.seed, s.data_seed), (0, None));
        let replicate =
            spec(json!({"tokens": {"books": 1000}, "seed": 3, "data_seed": 5})).unwrap();
        assert_eq!((replicate.seed, replicate.data_seed), (3, Some(5)));
        // The job round-trips through its JSON file.
        let job = Job::Train(Box::new(s));
        let text = serde_json::to_string(&job).unwrap();
        assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), job);
    }

    #[test]
    fn tokens_win_over_weights_as_in_ddo_fanout_children() {
        let s = spec(json!({
            "tokens": {"a": 300, "b": 100},
            "weights": {"a": 0.75, "b": 0.25},
            "total_tokens": 400,
            "run": "a-x3", "perturbed": "a", "multiplier": 3.0
        }))
        .unwrap();
        assert_eq!(
            s.mixture,
            MixtureSpec::Tokens([("a".into(), 300.0), ("b".into(), 100.0)].into())
        );
    }

    #[test]
    fn weights_come_from_a_weights_file_with_its_total() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("weights.json");
        std::fs::write(
            &file,
            r#"{"weights": {"a": 0.5, "b": 0.5}, "total_tokens": 1e6}"#,
        )
        .unwrap();
        let m = mixture(&Map::new(), Some(&file)).unwrap().unwrap();
        assert_eq!(
            m,
            MixtureSpec::Weights {
                weights: [("a".into(), 0.5), ("b".into(), 0.5)].into(),
                total_tokens: 1e6
            }
        );
        // A param total overrides the file's.
        let m = mixture(&params(json!({"total_tokens": 10})), Some(&file))
            .unwrap()
            .unwrap();
        assert!(matches!(m, MixtureSpec::Weights { total_tokens, .. } if total_tokens == 10.0));
        std::fs::write(&file, r#"{"w": {}}"#).unwrap();
        assert!(mixture(&Map::new(), Some(&file)).is_err());
    }

    #[test]
    fn bad_params_name_the_param_and_say_what_to_do() {
        let err = spec(json!({})).unwrap_err();
        assert!(err.hint().unwrap().contains("weights"), "{err}");
        let err = spec(json!({"tokens": {"a": 1}, "model": "gpt-2"})).unwrap_err();
        assert!(err.to_string().contains("model"), "{err}");
        assert!(err.hint().unwrap().contains("gpt2-medium"), "{err}");
        let err = spec(json!({"weights": {"a": 1}})).unwrap_err();
        assert!(err.to_string().contains("total_tokens"), "{err}");
        let err = spec(json!({"tokens": {"a": 1}, "schedule": "step"})).unwrap_err();
        assert!(err.hint().unwrap().contains("cosine"), "{err}");
        let err = spec(json!({"tokens": {"a": 1}, "batch_size": 0})).unwrap_err();
        assert!(err.to_string().contains("batch_size"), "{err}");
        let err = spec(json!({"tokens": {"a": 1}, "lr": 1e-4, "min_lr": 1e-3})).unwrap_err();
        assert!(err.to_string().contains("min_lr"), "{err}");
        let err = spec(json!({"tokens": {"a": 1}, "model_overrides": {"n_head": 3}})).unwrap_err();
        assert!(err.to_string().contains("heads"), "{err}");
        let err = spec(json!({"tokens": {"a": -5}})).unwrap_err();
        assert!(err.to_string().contains("-5"), "{err}");
    }
}
