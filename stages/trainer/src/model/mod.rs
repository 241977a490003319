//! The networks, as functions over a [`ModelConfig`]. Parameters carry Hugging Face's names and
//! shapes (`transformer.h.0.attn.c_attn.weight`, `bert.encoder.layer.0.attention.self.query.weight`),
//! so a model saves as a `model.safetensors` that `transformers` loads.
//!
//! Master weights are fp32. On CUDA the trainer runs in what its keys call
//! `cuda bf16-matmul fp32-master`: the inputs of every matrix product (the linear layers, the
//! attention through `scaled_dot_product_attention`, the tied output projection) are cast to
//! bf16 by hand, while embeddings, residual sums, layer norm, the loss and AdamW stay fp32.
//! This is not autocast: tch 0.26 binds only CUDA autocast's on/off switch, whose default dtype
//! is fp16, and fp16 without loss scaling would be a different, worse training. On the CPU
//! everything is fp32; `tests/bf16.rs` checks the bf16 casts on the CPU against PyTorch.

mod bert;
mod gpt2;

use crate::TorchResult;
use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use autoscale_train::error::TrainError;
use autoscale_train::masking::mask_tokens;
use autoscale_train::preset::{Arch, ModelConfig};
use autoscale_train::rng::SplitMix64;

/// A model's parameters by name, in a fixed order.
#[derive(Debug)]
pub struct Params {
    pub tensors: Vec<(String, Tensor)>,
    /// Seeds the init: each parameter draws from its own stream, keyed by its name, so the init
    /// depends on nothing but the seed (not on torch's global generator, nor on the device).
    /// `None`: zeros, for a model about to be loaded.
    seed: Option<u64>,
}

impl Params {
    fn new(seed: Option<u64>) -> Self {
        Self {
            tensors: Vec::new(),
            seed,
        }
    }

    /// A new trainable parameter, initialised on the CPU (so a seed gives the same weights on
    /// any device) and moved to `device`.
    fn add(&mut self, name: String, init: Tensor, device: Device) -> Tensor {
        let t = init.to_device(device).set_requires_grad(true);
        self.tensors.push((name, t.shallow_clone()));
        t
    }

    fn normal(&mut self, name: String, shape: &[i64], std: f64, device: Device) -> Tensor {
        let Some(seed) = self.seed else {
            return self.zeros(name, shape, device);
        };
        let mut rng = SplitMix64::for_stream(seed, &[b"init", name.as_bytes()]);
        let n: i64 = shape.iter().product();
        let mut values = Vec::with_capacity(n as usize);
        // Box–Muller, two normals per pair of uniforms.
        while values.len() < n as usize {
            let u1 = 1.0 - rng.unit();
            let u2 = rng.unit();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let theta = std::f64::consts::TAU * u2;
            values.push((r * theta.cos()) as f32);
            values.push((r * theta.sin()) as f32);
        }
        values.truncate(n as usize);
        let init = Tensor::from_slice(&values).view(shape);
        self.add(name, init, device)
    }

    fn zeros(&mut self, name: String, shape: &[i64], device: Device) -> Tensor {
        self.add(
            name,
            Tensor::zeros(shape, (Kind::Float, Device::Cpu)),
            device,
        )
    }

    fn ones(&mut self, name: String, shape: &[i64], device: Device) -> Tensor {
        self.add(
            name,
            Tensor::ones(shape, (Kind::Float, Device::Cpu)),
            device,
        )
    }

    /// Whether AdamW decays it: matrices and embeddings, not biases or norms.
    pub fn decays(name: &str, t: &Tensor) -> bool {
        t.dim() >= 2 && !name.contains("LayerNorm") && !name.contains(".ln_")
    }

    /// Overwrites every parameter with the tensor of the same name; all must be present with
    /// the same shape.
    pub fn load(&mut self, tensors: Vec<(String, Tensor)>, what: &str) -> Result<(), TrainError> {
        let mut by_name: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        let _guard = tch::no_grad_guard();
        for (name, p) in &mut self.tensors {
            let src = by_name
                .remove(name.as_str())
                .ok_or_else(|| TrainError::torch(format!("{what} has no tensor `{name}`")))?;
            if src.size() != p.size() {
                return Err(TrainError::torch(format!(
                    "{what}: `{name}` has shape {:?}, the model {:?}",
                    src.size(),
                    p.size()
                )));
            }
            p.f_copy_(&src).torch()?;
        }
        Ok(())
    }
}

/// Input ids and what to predict.
pub struct Batch {
    /// `[batch, seq]` token ids.
    pub inputs: Tensor,
    pub targets: Targets,
    /// How many targets the batch scores.
    pub count: i64,
}

impl Batch {
    /// GPT-2: each window of `seq + 1` tokens gives inputs `[..seq]` and targets `[1..]`.
    /// `non_eot`: targets that are text, not end-of-text (for bits per byte).
    pub fn next_token(windows: &[Vec<i64>], eot: i64, device: Device) -> (Self, i64) {
        let rows = windows.len() as i64;
        let t = windows.first().map_or(0, |w| w.len() as i64 - 1);
        let mut inputs = Vec::with_capacity((rows * t) as usize);
        let mut targets = Vec::with_capacity((rows * t) as usize);
        for w in windows {
            inputs.extend_from_slice(&w[..w.len() - 1]);
            targets.extend_from_slice(&w[1..]);
        }
        let non_eot = targets.iter().filter(|&&x| x != eot).count() as i64;
        let batch = Batch {
            inputs: Tensor::from_slice(&inputs)
                .view([rows, t])
                .to_device(device),
            targets: Targets::Next(
                Tensor::from_slice(&targets)
                    .view([rows, t])
                    .to_device(device),
            ),
            count: rows * t,
        };
        (batch, non_eot)
    }

    /// BERT: the first `seq` tokens of each window, corrupted by [`mask_tokens`], with one
    /// masked token forced when the draw chose none (so the loss is defined). `rng(row)` is the
    /// generator for row `row`. `None` when nothing can be masked.
    pub fn masked(
        windows: &[Vec<i64>],
        config: &ModelConfig,
        mut rng: impl FnMut(usize) -> SplitMix64,
        device: Device,
    ) -> Option<Self> {
        let mask = config.mask_token?;
        let rows = windows.len() as i64;
        let t = windows.first().map_or(0, |w| w.len() as i64 - 1);
        let mut inputs = Vec::with_capacity((rows * t) as usize);
        let mut positions = Vec::new();
        let mut ids = Vec::new();
        for (r, w) in windows.iter().enumerate() {
            let mut row = w[..w.len() - 1].to_vec();
            let chosen = mask_tokens(
                &mut row,
                config.eot_token,
                mask,
                config.vocab_size,
                &mut rng(r),
            );
            for (i, original) in chosen {
                positions.push(r as i64 * t + i as i64);
                ids.push(original);
            }
            inputs.extend(row);
        }
        if positions.is_empty() {
            let first = inputs.iter().position(|&x| x != config.eot_token)?;
            positions.push(first as i64);
            ids.push(inputs[first]);
            inputs[first] = mask;
        }
        Some(Batch {
            inputs: Tensor::from_slice(&inputs)
                .view([rows, t])
                .to_device(device),
            count: ids.len() as i64,
            targets: Targets::Masked {
                positions: Tensor::from_slice(&positions).to_device(device),
                ids: Tensor::from_slice(&ids).to_device(device),
            },
        })
    }
}

pub enum Targets {
    /// GPT-2: the next token at every position, `[batch, seq]`.
    Next(Tensor),
    /// BERT: the original ids at the masked positions (flat indices into `[batch × seq]`).
    Masked { positions: Tensor, ids: Tensor },
}

enum Net {
    Gpt2(gpt2::Gpt2),
    Bert(bert::Bert),
}

/// A network and its parameters.
pub struct Model {
    pub config: ModelConfig,
    pub params: Params,
    pub device: Device,
    /// The dtype of matrix products: bf16 on CUDA, fp32 on the CPU.
    pub compute: Kind,
    net: Net,
}

impl Model {
    /// A freshly initialised model (Hugging Face's init: normal(0, 0.02), residual projections
    /// of GPT-2 scaled by 1/√(2 × layers), zero biases, unit norms), from `seed`.
    pub fn new(config: &ModelConfig, device: Device, seed: u64) -> Self {
        Self::build(config, device, Some(seed))
    }

    /// A model of zeros, to load weights into.
    pub fn empty(config: &ModelConfig, device: Device) -> Self {
        Self::build(config, device, None)
    }

    fn build(config: &ModelConfig, device: Device, seed: Option<u64>) -> Self {
        let mut params = Params::new(seed);
        let net = match config.arch {
            Arch::Gpt2 => Net::Gpt2(gpt2::Gpt2::new(config, &mut params, device)),
            Arch::Bert => Net::Bert(bert::Bert::new(config, &mut params, device)),
        };
        let compute = if device.is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        Self {
            config: config.clone(),
            params,
            device,
            compute,
            net,
        }
    }

    /// The summed cross-entropy (nats, fp32 scalar) over the batch's targets.
    pub fn loss_sum(&self, batch: &Batch, train: bool) -> Result<Tensor, TrainError> {
        self.loss_sum_in(batch, train, self.compute)
    }

    /// [`Model::loss_sum`] with matrix products in `compute` (fp32 to compare with other code).
    pub fn loss_sum_in(
        &self,
        batch: &Batch,
        train: bool,
        compute: Kind,
    ) -> Result<Tensor, TrainError> {
        let dropout = if train { self.config.dropout } else { 0.0 };
        match (&self.net, &batch.targets) {
            (Net::Gpt2(net), Targets::Next(targets)) => {
                let logits = net.forward(&batch.inputs, dropout, compute);
                let v = self.config.vocab_size;
                Ok(logits
                    .view([-1, v])
                    .to_kind(Kind::Float)
                    .f_cross_entropy_loss::<Tensor>(
                        &targets.view([-1]),
                        None,
                        tch::Reduction::Sum,
                        -100,
                        0.0,
                    )
                    .torch()?)
            }
            (Net::Bert(net), Targets::Masked { positions, ids }) => {
                let logits = net.forward_at(&batch.inputs, positions, dropout, compute);
                Ok(logits
                    .to_kind(Kind::Float)
                    .f_cross_entropy_loss::<Tensor>(ids, None, tch::Reduction::Sum, -100, 0.0)
                    .torch()?)
            }
            (Net::Gpt2(_), Targets::Masked { .. }) | (Net::Bert(_), Targets::Next(_)) => Err(
                TrainError::torch("a batch built for the other architecture (a bug)"),
            ),
        }
    }

    /// Full-sequence logits (`[batch, seq, vocab]`, fp32): for tests against Hugging Face.
    pub fn logits(&self, inputs: &Tensor) -> Tensor {
        self.logits_in(inputs, self.compute)
    }

    /// [`Model::logits`] with matrix products in `compute`: the bf16 path can be checked on
    /// the CPU, against PyTorch doing the same casts.
    pub fn logits_in(&self, inputs: &Tensor, compute: Kind) -> Tensor {
        let all = Tensor::arange(inputs.numel() as i64, (Kind::Int64, self.device));
        match &self.net {
            Net::Gpt2(net) => net.forward(inputs, 0.0, compute).to_kind(Kind::Float),
            Net::Bert(net) => net
                .forward_at(inputs, &all, 0.0, compute)
                .view([inputs.size()[0], inputs.size()[1], -1])
                .to_kind(Kind::Float),
        }
    }
}

/// `x @ w + b` with `w: [in, out]` (GPT-2's Conv1D), in `dtype`.
fn conv1d(x: &Tensor, w: &Tensor, b: &Tensor, dtype: Kind) -> Tensor {
    let mut shape = x.size();
    let last = shape.len() - 1;
    let n_in = shape[last];
    shape[last] = w.size()[1];
    b.to_kind(dtype)
        .addmm(&x.reshape([-1, n_in]).to_kind(dtype), &w.to_kind(dtype))
        .view(shape.as_slice())
}

/// `x @ w.T + b` with `w: [out, in]` (torch's Linear, BERT), in `dtype`.
fn linear(x: &Tensor, w: &Tensor, b: &Tensor, dtype: Kind) -> Tensor {
    x.to_kind(dtype)
        .linear(&w.to_kind(dtype), Some(b.to_kind(dtype)))
}

/// Rows of `w` at `ids`.
fn embed(w: &Tensor, ids: &Tensor) -> Tensor {
    Tensor::embedding(w, ids, -1, false, false)
}

/// Layer norm in fp32.
fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    let d = w.size()[0];
    x.to_kind(Kind::Float)
        .layer_norm([d], Some(w), Some(b), eps, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(name: &str) -> Model {
        let config = ModelConfig::preset(name, 257, 256, None).unwrap();
        Model::new(&config, Device::Cpu, 0)
    }

    #[test]
    fn parameters_match_the_config_count_and_hugging_face_names() {
        for name in ["gpt2-tiny", "bert-tiny"] {
            let m = tiny(name);
            let n: i64 = m.params.tensors.iter().map(|(_, t)| t.numel() as i64).sum();
            assert_eq!(n, m.config.parameter_count(), "{name}");
        }
        let gpt = tiny("gpt2-tiny");
        let names: Vec<&str> = gpt.params.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"transformer.h.1.attn.c_attn.weight"));
        let c_attn = &gpt.params.tensors[names
            .iter()
            .position(|n| *n == "transformer.h.0.attn.c_attn.weight")
            .unwrap()]
        .1;
        // Conv1D stores [in, out].
        assert_eq!(c_attn.size(), [128, 384]);
        assert!(!Params::decays(
            "transformer.h.0.ln_1.weight",
            c_attn.get(0).as_ref()
        ));
    }

    #[test]
    fn gpt2_attends_only_to_the_past_and_bert_to_both_sides() {
        let ids = Tensor::from_slice(&[5i64, 9, 200, 13, 72, 256]).view([1, 6]);
        let later = ids.copy();
        let _ = later.get(0).get(5).fill_(40);
        let _guard = tch::no_grad_guard();
        let gpt = tiny("gpt2-tiny");
        let (a, b) = (gpt.logits(&ids), gpt.logits(&later));
        let early = |t: &Tensor| t.narrow(1, 0, 5);
        assert!(
            early(&a).allclose(&early(&b), 0.0, 0.0, false),
            "the future leaked"
        );
        assert!(
            !a.get(0)
                .get(5)
                .allclose(&b.get(0).get(5), 1e-6, 1e-6, false)
        );
        let bert = tiny("bert-tiny");
        let (a, b) = (bert.logits(&ids), bert.logits(&later));
        assert!(
            !a.get(0)
                .get(0)
                .allclose(&b.get(0).get(0), 1e-6, 1e-6, false),
            "BERT sees both sides"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_init() {
        let (a, b) = (tiny("gpt2-tiny"), tiny("gpt2-tiny"));
        let config = ModelConfig::preset("gpt2-tiny", 257, 256, None).unwrap();
        let c = Model::new(&config, Device::Cpu, 1);
        let w = |m: &Model| m.params.tensors[0].1.shallow_clone();
        assert!(w(&a).equal(&w(&b)));
        assert!(!w(&a).equal(&w(&c)));
        let std = f64::try_from(w(&a).std(true)).unwrap();
        assert!((std - 0.02).abs() < 0.002, "{std}");
    }
}
