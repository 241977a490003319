//! The training loop: mixture draw, AdamW with warmup and decay, clipping, accumulation,
//! checkpoints, progress, the validation curve, the final evaluation and the export.
//!
//! Reproducibility: the init comes from the seed (on the CPU, then moved), every data draw and
//! mask from [`SplitMix64`] streams keyed by seed and position, and checkpoints hold the exact
//! parameters and optimizer moments. So on the CPU (same threads), the same seed and inputs give
//! the same final loss, and a resumed run gives what an uninterrupted one would have.

use crate::TorchResult;
use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, CheckpointIndex};
use crate::evaluate::{self, DomainMetrics, check_ids, eval_sets, evaluate};
use crate::export::{self, ModelInfo};
use crate::model::{Batch, Model};
use crate::optim::{AdamW, backward, clip_grad_norm};
use autoscale_train::JobHooks;
use autoscale_train::data::{Corpus, Split};
use autoscale_train::error::TrainError;
use autoscale_train::preset::{Arch, ModelConfig};
use autoscale_train::rng::SplitMix64;
use autoscale_train::sampling::SequencePlan;
use autoscale_train::schedule::LrSchedule;
use autoscale_train::spec::TrainSpec;

/// Steps the final training loss averages over.
const FINAL_LOSS_STEPS: usize = 20;

/// Everything that shapes the result; a checkpoint is used only under the same fingerprint.
fn fingerprint(spec: &TrainSpec) -> String {
    let mut value = serde_json::to_value(spec).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        for runtime in [
            "data",
            "out_dir",
            "scratch_dir",
            "device",
            "threads",
            "log_every",
            "checkpoint_every",
            "checkpoint_minutes",
        ] {
            map.remove(runtime);
        }
    }
    blake3::hash(value.to_string().as_bytes())
        .to_hex()
        .to_string()
}

struct Run<'a> {
    spec: &'a TrainSpec,
    corpus: Corpus,
    plan: SequencePlan,
    /// The training split of each planned domain, by plan index.
    splits: Vec<String>,
    /// Replica 0: the weights the optimizer updates, evaluates and saves.
    model: Model,
    /// Replicas 1.., copies of replica 0 before the first step and after every step.
    others: Vec<Model>,
    /// Replica r's device.
    seq_len: u64,
}

/// Sums the replicas' gradients into replica 0's, on `device`, adding replicas in order
/// 0, 1, …, N−1: a fixed order, so that a run repeats exactly. Undefined gradients (a
/// parameter no row reached) are skipped.
fn reduce(grads: Vec<Option<Vec<Tensor>>>, device: Device) -> Result<Vec<Tensor>, TrainError> {
    let _guard = tch::no_grad_guard();
    let mut replicas = grads.into_iter().flatten();
    let Some(mut sum) = replicas.next() else {
        return Ok(Vec::new());
    };
    for other in replicas {
        for (a, g) in sum.iter_mut().zip(other) {
            if !g.defined() {
                continue;
            }
            let g = g.f_to_device(device).torch()?;
            if a.defined() {
                let _ = a.f_add_(&g).torch()?;
            } else {
                *a = g;
            }
        }
    }
    Ok(sum)
}

impl Run<'_> {
    fn replica(&self, r: usize) -> &Model {
        if r == 0 {
            &self.model
        } else {
            &self.others[r - 1]
        }
    }

    /// Copies replica 0's weights into the others.
    fn broadcast(&self) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        for other in &self.others {
            for ((_, dst), (_, src)) in other.params.tensors.iter().zip(&self.model.params.tensors)
            {
                dst.shallow_clone().f_copy_(src).torch()?;
            }
        }
        Ok(())
    }

    fn split(&self, domain: u32) -> Result<&Split, TrainError> {
        Ok(&self.corpus.domain(&self.splits[domain as usize])?.train)
    }

    /// The micro-batches of training sequences `lo..hi`, each split into contiguous shares of
    /// its rows, one per replica (the first `rows mod N` replicas take one more; a replica
    /// with no rows gets no batch), on the replica's device.
    fn batches(&self, lo: u64, hi: u64) -> Result<Vec<Vec<(usize, Batch)>>, TrainError> {
        let mut out = Vec::new();
        let mut start = lo;
        while start < hi {
            let end = (start + self.spec.batch_size).min(hi);
            let mut windows = Vec::with_capacity((end - start) as usize);
            for i in start..end {
                let Some(draw) = self.plan.get(i) else { break };
                let mut w = vec![0i64; self.seq_len as usize + 1];
                self.split(draw.domain)?
                    .tokens
                    .read(u64::from(draw.window) * self.seq_len, &mut w)?;
                windows.push(w);
            }
            check_ids(&windows, &self.model.config, "training data")?;
            let config = &self.model.config;
            let n = 1 + self.others.len();
            let (base, extra) = (windows.len() / n, windows.len() % n);
            let mut micro = Vec::with_capacity(n);
            let mut first = 0usize;
            for r in 0..n {
                let device = self.replica(r).device;
                let rows = &windows[first..first + base + usize::from(r < extra)];
                let offset = start + first as u64;
                first += rows.len();
                if rows.is_empty() {
                    continue;
                }
                let batch = match config.arch {
                    Arch::Gpt2 => Some(Batch::next_token(rows, config.eot_token, device).0),
                    // Masks are drawn per global row, whichever replica takes it.
                    Arch::Bert => Batch::masked(
                        rows,
                        config,
                        |row| {
                            SplitMix64::for_stream(
                                self.spec.seed,
                                &[b"mask", &(offset + row as u64).to_le_bytes()],
                            )
                        },
                        device,
                    ),
                };
                micro.extend(batch.map(|b| (r, b)));
            }
            out.push(micro);
            start = end;
        }
        Ok(out)
    }
}

fn curve_point(
    step: u64,
    tokens: u64,
    train_loss: Option<f64>,
    m: &BTreeMap<String, DomainMetrics>,
) -> Value {
    let (mean_loss, mean_ppl, worst_ppl) = evaluate::summary(m);
    let domains: BTreeMap<&String, f64> = m.iter().map(|(d, x)| (d, x.loss)).collect();
    json!({
        "step": step,
        "tokens": tokens,
        "train_loss": train_loss,
        "mean_loss": mean_loss,
        "mean_ppl": mean_ppl,
        "worst_ppl": worst_ppl,
        "domains": domains,
    })
}

/// Two held-out windows of the first evaluated domain that has them, for the export's sample.
fn sample_windows(
    corpus: &Corpus,
    domains: &[String],
    seq_len: u64,
) -> Result<Vec<Vec<i64>>, TrainError> {
    for d in domains {
        let val = &corpus.domain(d)?.val;
        let n = val.windows(seq_len).min(2);
        if n > 0 {
            return (0..n)
                .map(|i| {
                    let mut w = vec![0i64; seq_len as usize + 1];
                    val.tokens.read(i * seq_len, &mut w).map(|()| w)
                })
                .collect();
        }
    }
    Ok(Vec::new())
}

fn mean_last(values: &VecDeque<f64>, n: usize) -> Option<f64> {
    let n = n.min(values.len());
    (n > 0).then(|| values.iter().rev().take(n).sum::<f64>() / n as f64)
}

pub fn train(spec: &TrainSpec, hooks: &JobHooks<'_>) -> Result<Value, TrainError> {
    let t_start = Instant::now();
    evaluate::set_threads(spec.threads);
    let devices = evaluate::devices(spec.device)?;
    let device = devices[0];
    let n_replicas = spec.replicas.unwrap_or(devices.len() as u64) as usize;
    // Replica r on device r mod D: two replicas on one GPU exercise the same path as two GPUs.
    let replica_devices: Vec<Device> = (0..n_replicas)
        .map(|r| devices[r % devices.len()])
        .collect();
    let quantities = spec.mixture.request().quantities()?;
    let corpus = match &spec.eval.domains {
        Some(eval) => {
            let mut needed: Vec<String> = quantities.keys().cloned().collect();
            needed.extend(
                eval.iter()
                    .filter(|d| !quantities.contains_key(*d))
                    .cloned(),
            );
            Corpus::open(&spec.data, spec.held_out, Some(&needed))?
        }
        None => Corpus::open(&spec.data, spec.held_out, None)?,
    };
    let eval_domains: Vec<String> = match &spec.eval.domains {
        Some(d) => d.clone(),
        None => corpus.domains.keys().cloned().collect(),
    };
    let mut config = ModelConfig::preset(
        &spec.model,
        corpus.vocab.size,
        corpus.vocab.eot,
        corpus.vocab.mask,
    )?
    .with_overrides(&spec.model_overrides)?;
    config.dropout = spec.dropout;
    let seq_len = spec.seq_len.unwrap_or(config.n_positions as u64);
    if seq_len as i64 > config.n_positions {
        return Err(TrainError::param_hint(
            "seq_len",
            format!(
                "{seq_len} is longer than the model's {} positions",
                config.n_positions
            ),
            "lower `seq_len`, or raise `model_overrides: {n_positions: ...}`",
        ));
    }
    let mut windows = BTreeMap::new();
    for d in quantities.keys() {
        windows.insert(d.clone(), corpus.domain(d)?.train.windows(seq_len));
    }
    let data_seed = spec.data_seed.unwrap_or(spec.seed);
    let plan = SequencePlan::new(&quantities, &windows, seq_len, spec.epochs, data_seed)?;
    let per_step = spec.batch_size * spec.grad_accum;
    let steps = plan.steps(per_step);
    let schedule = LrSchedule {
        peak: spec.lr,
        min: spec.min_lr,
        warmup_steps: (spec.warmup * steps as f64).round() as u64,
        total_steps: steps,
        decay: spec.schedule,
    };
    let log_every = spec.log_every.unwrap_or((steps / 100).max(1));
    let eval_every = spec.eval.every.unwrap_or((steps / 10).max(1));
    let checkpoint_every = spec.checkpoint_every.unwrap_or((steps / 20).max(1));
    let fingerprint = fingerprint(spec);

    let model = Model::new(&config, device, spec.seed);
    // The other replicas get replica 0's weights before the first step (drawing the init once)
    // and again after every step.
    let others: Vec<Model> = replica_devices[1..]
        .iter()
        .map(|&d| Model::empty(&config, d))
        .collect();
    let mut opt = AdamW::new(
        &model.params,
        spec.beta1,
        spec.beta2,
        spec.adam_eps,
        spec.weight_decay,
    );
    let splits = plan.domains.iter().map(|d| d.domain.clone()).collect();
    let mut run = Run {
        spec,
        corpus,
        plan,
        splits,
        model,
        others,
        seq_len,
    };
    let curve_sets = eval_sets(&run.corpus, &eval_domains, seq_len, spec.eval.curve_tokens)?;

    let mut step = 0u64;
    let mut curve: Vec<Value> = Vec::new();
    let mut recent: VecDeque<f64> = VecDeque::new();
    let mut train_seconds = 0.0;
    let resumed_from = match checkpoint::latest(&spec.scratch_dir, &fingerprint, hooks.log) {
        Some(index) => {
            checkpoint::load(&spec.scratch_dir, &index, &mut run.model.params, &mut opt)?;
            step = index.step;
            curve = index.curve;
            recent = index.recent_losses.into_iter().collect();
            train_seconds = index.train_seconds;
            hooks.say(&format!("resumed from the checkpoint at step {step}"));
            Some(step)
        }
        None => None,
    };
    run.broadcast()?;

    // What the key calls it (`autoscale_train::device_identity`): bf16 inputs to matrix
    // products, everything else fp32.
    let dtype = if run.model.compute == Kind::BFloat16 {
        "bf16-matmul"
    } else {
        "fp32"
    };
    hooks.say(&format!(
        "{} ({} parameters) on {device:?} in {dtype}{}, {} steps of {} tokens ({} sequences of {seq_len}), {} tokens in all",
        config.preset,
        config.parameter_count(),
        if n_replicas > 1 {
            format!(", {n_replicas} data-parallel replicas on {replica_devices:?}")
        } else {
            String::new()
        },
        steps,
        per_step * seq_len,
        per_step,
        run.plan.tokens(),
    ));
    for d in &run.plan.domains {
        hooks.say(&format!(
            "  {}: {} sequences per pass of {} windows, {:.3} epochs",
            d.domain, d.sequences, d.windows, d.epochs
        ));
    }

    let attempt_start = Instant::now();
    let attempt_step = step;
    let mut seconds_at_attempt_start = train_seconds;
    let mut last_checkpoint = Instant::now();
    let mut window = (Instant::now(), 0u64);
    let mut last_logged = step;
    let mut pending: Vec<Tensor> = Vec::new();
    let flush = |pending: &mut Vec<Tensor>, recent: &mut VecDeque<f64>| -> Result<(), TrainError> {
        for t in pending.drain(..) {
            recent.push_back(t.f_double_value(&[]).torch()?);
        }
        while recent.len() > FINAL_LOSS_STEPS.max(log_every as usize) {
            recent.pop_front();
        }
        Ok(())
    };
    let mut eval_seconds = 0.0;
    while step < steps {
        if hooks.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(TrainError::Cancelled);
        }
        let lo = step * per_step;
        let hi = (lo + per_step).min(run.plan.len());
        let batches = run.batches(lo, hi)?;
        let total: i64 = batches.iter().flatten().map(|(_, b)| b.count).sum();
        if spec.dropout > 0.0 {
            // Dropout draws from torch's generator; seeding it per step keeps a resumed run
            // on the same masks (this process runs one training).
            tch::manual_seed((spec.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)) as i64);
        }
        let mut step_loss = Tensor::zeros([], (Kind::Float, device));
        // Each replica's gradients of its rows' summed loss over the step's global count of
        // targets (BERT's masked tokens differ per replica; the global count keeps the step
        // that of one replica), accumulated over the micro-batches.
        let mut grads: Vec<Option<Vec<Tensor>>> = (0..n_replicas).map(|_| None).collect();
        for micro in &batches {
            for (r, batch) in micro {
                let model = run.replica(*r);
                let loss = model.loss_sum(batch, true)? / total.max(1) as f64;
                grads[*r] = Some(backward(&loss, &model.params, grads[*r].take()).torch()?);
                step_loss += loss.detach().to_device(device);
            }
        }
        let grads = reduce(grads, device)?;
        clip_grad_norm(&grads, spec.grad_clip);
        opt.step(&run.model.params, &grads, schedule.at(step));
        run.broadcast()?;
        step += 1;
        pending.push(step_loss);
        window.1 += (hi - lo) * seq_len;

        if step.is_multiple_of(log_every) || step == steps {
            flush(&mut pending, &mut recent)?;
            let loss = mean_last(&recent, (step - last_logged) as usize);
            let secs = window.0.elapsed().as_secs_f64();
            let tokens_per_s = window.1 as f64 / secs.max(1e-9);
            (hooks.progress)(json!({
                "step": step,
                "steps": steps,
                "tokens": step * per_step * seq_len,
                "loss": loss,
                "lr": schedule.at(step - 1),
                "tokens_per_s": tokens_per_s,
            }));
            hooks.say(&format!(
                "step {step}/{steps}  loss {:.4}  lr {:.3e}  {tokens_per_s:.0} tok/s",
                loss.unwrap_or(f64::NAN),
                schedule.at(step - 1)
            ));
            last_logged = step;
            window = (Instant::now(), 0);
        }
        if eval_every > 0 && (step.is_multiple_of(eval_every) || step == steps) {
            let t = Instant::now();
            flush(&mut pending, &mut recent)?;
            let m = evaluate(&run.model, &run.corpus, &curve_sets, spec.batch_size)?;
            let point = curve_point(step, step * per_step * seq_len, mean_last(&recent, 1), &m);
            hooks.say(&format!(
                "step {step}: validation mean loss {:.4}, mean ppl {:.3}",
                point["mean_loss"].as_f64().unwrap_or(f64::NAN),
                point["mean_ppl"].as_f64().unwrap_or(f64::NAN)
            ));
            (hooks.progress)(json!({"step": step, "steps": steps, "eval": point.clone()}));
            curve.push(point);
            eval_seconds += t.elapsed().as_secs_f64();
            window.0 += t.elapsed();
        }
        if step < steps
            && (step.is_multiple_of(checkpoint_every)
                || last_checkpoint.elapsed().as_secs_f64() > spec.checkpoint_minutes * 60.0)
        {
            flush(&mut pending, &mut recent)?;
            train_seconds = seconds_at_attempt_start + attempt_start.elapsed().as_secs_f64();
            checkpoint::save(
                &spec.scratch_dir,
                CheckpointIndex {
                    version: 1,
                    fingerprint: fingerprint.clone(),
                    step,
                    file: String::new(),
                    curve: curve.clone(),
                    recent_losses: recent.iter().copied().collect(),
                    train_seconds,
                },
                &run.model.params,
                &opt,
            )?;
            last_checkpoint = Instant::now();
        }
    }
    flush(&mut pending, &mut recent)?;
    let attempt_seconds = attempt_start.elapsed().as_secs_f64() - eval_seconds;
    seconds_at_attempt_start += attempt_start.elapsed().as_secs_f64();
    let final_train_loss = mean_last(&recent, FINAL_LOSS_STEPS);

    let final_sets = eval_sets(&run.corpus, &eval_domains, seq_len, spec.eval.tokens)?;
    let metrics = evaluate(&run.model, &run.corpus, &final_sets, spec.batch_size)?;
    for (d, m) in &metrics {
        hooks.say(&format!(
            "  {d}: loss {:.4}  ppl {:.3}  bpb {:.4}",
            m.loss, m.ppl, m.bpb
        ));
    }
    let trained_this_attempt = (step - attempt_step) * per_step * seq_len;
    let domains: BTreeMap<&str, Value> = run
        .plan
        .domains
        .iter()
        .map(|d| {
            (
                d.domain.as_str(),
                serde_json::to_value(d).unwrap_or_default(),
            )
        })
        .collect();
    let train = json!({
        "model": config.preset,
        "parameters": config.parameter_count(),
        "device": if device.is_cuda() { "cuda" } else { "cpu" },
        "cuda_visible_devices": std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        "replicas": n_replicas,
        "dtype": dtype,
        "steps": steps,
        "seq_len": seq_len,
        "batch_size": spec.batch_size,
        "grad_accum": spec.grad_accum,
        "tokens_per_step": per_step * seq_len,
        "tokens_trained": run.plan.tokens(),
        "passes": spec.epochs,
        "tokens": run.plan.domains.iter().map(|d| (d.domain.clone(), d.trained_tokens)).collect::<BTreeMap<_, _>>(),
        "epochs": run.plan.domains.iter().map(|d| (d.domain.clone(), d.epochs)).collect::<BTreeMap<_, _>>(),
        "domains": domains,
        "final_train_loss": final_train_loss,
        "resumed_from_step": resumed_from,
        "seconds": seconds_at_attempt_start,
        "tokens_per_s": trained_this_attempt as f64 / attempt_seconds.max(1e-9),
        "lr": spec.lr,
        "schedule": spec.schedule,
        "warmup_steps": schedule.warmup_steps,
        "seed": spec.seed,
        "data_seed": spec.data_seed.unwrap_or(spec.seed),
        "tokenizer": run.corpus.vocab.tokenizer,
        "data_layout": run.corpus.layout,
    });
    export::save(
        &spec.out_dir.join("model"),
        &run.model,
        &ModelInfo {
            config: config.clone(),
            seq_len,
            vocab: run.corpus.vocab.clone(),
            train: train.clone(),
        },
        &sample_windows(&run.corpus, &eval_domains, seq_len)?,
    )?;
    let value = evaluate::eval_json(&metrics, curve, train);
    evaluate::write_json(&spec.out_dir.join("eval.json"), &value)?;
    hooks.say(&format!(
        "done in {:.1}s: mean validation loss {:.4}",
        t_start.elapsed().as_secs_f64(),
        value["mean_loss"].as_f64().unwrap_or(f64::NAN)
    ));
    Ok(json!({
        "steps": steps,
        "tokens_trained": run.plan.tokens(),
        "final_train_loss": final_train_loss,
        "mean_loss": value["mean_loss"],
        "mean_ppl": value["mean_ppl"],
        "worst_ppl": value["worst_ppl"],
        "resumed_from_step": resumed_from,
        "device": if device.is_cuda() { "cuda" } else { "cpu" },
        "cuda_visible_devices": std::env::var("CUDA_VISIBLE_DEVICES").ok(),
    }))
}
