//! The trainer's bf16 path (what it runs on CUDA: bf16 inputs to every matrix product, fp32
//! weights, layer norm, residuals and loss) checked on the CPU against PyTorch doing the same
//! casts on the same weights (`tests/bf16_reference.py`).
//!
//! Tolerances, and why:
//! - fp32: 1e-5 relative on the summed loss, 1e-4 absolute on each logit. Both sides run the
//!   same libtorch CPU kernels; only the order of a few reductions may differ.
//! - bf16: 2e-3 relative on the summed loss, 0.02 absolute on each logit (logits here are of
//!   order 1). bf16 keeps 8 significant bits, so one rounding is up to 2^-9 ≈ 2e-3 relative;
//!   a different summation order or fusion on either side may round a matrix product's input
//!   the other way, and a few such flips through two layers move a logit by a few bf16 ulps.
//!   A bug in the casts (a product left in fp32, a norm done in bf16) moves the loss by more,
//!   and the test also checks that the bf16 logits are not the fp32 ones (the casts happened).

use std::path::{Path, PathBuf};

use autoscale_train::preset::ModelConfig;
use autoscale_train::rng::SplitMix64;
use autoscale_trainer::model::{Batch, Model};
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

const SEQ: usize = 64;
const ROWS: usize = 4;
const EOT: i64 = 256;

/// The Python with torch: `$AUTOSCALE_TEST_PYTHON`, else the workspace's `.venv`.
fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AUTOSCALE_TEST_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    venv.exists().then_some(venv)
}

fn skip(why: &str) {
    assert!(
        std::env::var_os("AUTOSCALE_REQUIRE_TRAINER").is_none(),
        "required (AUTOSCALE_REQUIRE_TRAINER is set) but {why}"
    );
    eprintln!("SKIPPED: {why}");
}

fn floats(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).expect("a float tensor")
}

#[test]
fn the_bf16_path_matches_pytorch_doing_the_same_casts() {
    let Some(python) = python() else {
        return skip("no Python with torch (set AUTOSCALE_TEST_PYTHON or create .venv)");
    };
    let config = ModelConfig::preset("gpt2-tiny", 257, SEQ as i64, None).expect("a preset");
    let model = Model::new(&config, Device::Cpu, 11);
    let mut rng = SplitMix64::new(5);
    let windows: Vec<Vec<i64>> = (0..ROWS)
        .map(|_| (0..=SEQ).map(|_| rng.below(257) as i64).collect())
        .collect();
    let (batch, _) = Batch::next_token(&windows, EOT, Device::Cpu);
    let _no_grad = tch::no_grad_guard();
    let ours = |kind: Kind| {
        let loss = f64::try_from(model.loss_sum_in(&batch, false, kind).expect("a loss"))
            .expect("a scalar");
        (loss, floats(&model.logits_in(&batch.inputs, kind)))
    };
    let (fp32_loss, fp32_logits) = ours(Kind::Float);
    let (bf16_loss, bf16_logits) = ours(Kind::BFloat16);

    let dir = tempfile::tempdir().expect("a temp dir");
    let named: Vec<(&str, &Tensor)> = model
        .params
        .tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t))
        .collect();
    Tensor::write_safetensors(&named, dir.path().join("weights.safetensors"))
        .expect("weights written");
    let inputs: Vec<Vec<i64>> = windows.iter().map(|w| w[..SEQ].to_vec()).collect();
    let targets: Vec<Vec<i64>> = windows.iter().map(|w| w[1..].to_vec()).collect();
    let case = json!({"input_ids": inputs, "targets": targets,
        "n_head": config.n_head, "eps": config.layer_norm_eps});
    std::fs::write(dir.path().join("case.json"), case.to_string()).expect("case written");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bf16_reference.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(dir.path())
        .output()
        .expect("python starts");
    if out.status.code() == Some(3) {
        return skip(&String::from_utf8_lossy(&out.stdout));
    }
    assert!(
        out.status.success(),
        "bf16_reference.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Value = serde_json::from_slice(&out.stdout).expect("JSON from the script");
    let max_diff = |a: &[f64], b: &Value| {
        let b: Vec<f64> = b
            .as_array()
            .expect("logits")
            .iter()
            .map(|v| v.as_f64().expect("a float"))
            .collect();
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();

    let torch_fp32 = theirs["fp32"]["loss_sum"].as_f64().expect("a loss");
    let torch_bf16 = theirs["bf16"]["loss_sum"].as_f64().expect("a loss");
    let (fp32_logit_diff, bf16_logit_diff) = (
        max_diff(&fp32_logits, &theirs["fp32"]["logits"]),
        max_diff(&bf16_logits, &theirs["bf16"]["logits"]),
    );
    let report = format!(
        "torch {}: fp32 loss {fp32_loss} vs {torch_fp32}, max logit diff {fp32_logit_diff:e}; \
         bf16 loss {bf16_loss} vs {torch_bf16}, max logit diff {bf16_logit_diff:e}",
        theirs["torch"]
    );
    eprintln!("{report}");
    assert!(rel(fp32_loss, torch_fp32) < 1e-5, "{report}");
    assert!(fp32_logit_diff < 1e-4, "{report}");
    assert!(rel(bf16_loss, torch_bf16) < 2e-3, "{report}");
    assert!(bf16_logit_diff < 0.02, "{report}");
    // The casts took effect: bf16 logits are not the fp32 ones.
    let cast_effect = fp32_logits
        .iter()
        .zip(&bf16_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(cast_effect > 1e-4, "bf16 logits equal fp32 ones: {report}");
}
