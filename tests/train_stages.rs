//! The `train` and `eval` kinds through the binaries: `autoscale` starts the `autoscale-train`
//! worker, which finds libtorch without `LD_LIBRARY_PATH` and links `libtorch_cuda` when it
//! exists; a training killed with `autoscale` resumes from its checkpoint on the rerun; `eval`
//! scores domains held out of training; a worker built from other code is refused. The trainings
//! themselves are tested in `stages/trainer/tests/training.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Workspace, events, stderr, with_outcome};
use serde_json::Value;

#[test]
fn doctor_finds_libtorch_without_ld_library_path() {
    let Some(trainer) = common::trainer() else {
        return;
    };
    let ws = Workspace::new();
    let out = ws
        .cmd(&["--json", "doctor"])
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    let version = info["version"].as_str().unwrap_or_default();
    assert!(version.starts_with("2.13.0"), "{info}");
    assert_eq!(info["trainer"].as_str(), Some(trainer.to_str().unwrap()));
    assert_eq!(info["identity"], info["expected_identity"], "{info}");
    let lib = PathBuf::from(info["library_dir"].as_str().unwrap());
    assert!(lib.join("libtorch_cpu.so").is_file(), "{info}");
    // A CUDA libtorch must really be loaded, not dropped by the linker's --as-needed.
    assert_eq!(
        info["cuda_library_loaded"].as_bool(),
        Some(lib.join("libtorch_cuda.so").is_file()),
        "{info}"
    );
    let text = ws
        .cmd(&["doctor"])
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("torch          2.13.0"), "{text}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("test setup");
    for entry in std::fs::read_dir(from).expect("test setup") {
        let entry = entry.expect("test setup");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("test setup");
    }
}

const PIPELINE: &str = r#"
name: train-test
stages:
  - id: train
    kind: train
    inputs: {data: "file:corpus"}
    params:
      model: gpt2-tiny
      tokens: {books: 40960, code: 40960, web: 20480}
      seq_len: 32
      batch_size: 8
      # Two data-parallel replicas (4 rows each): the kill below resumes them from a checkpoint.
      replicas: 2
      lr: 0.003
      threads: 1
      checkpoint_every: 10
      log_every: 10
      eval_every: 0
      eval_tokens: 1024
      eval_domains: [books, code, web]
  - id: heldout
    kind: eval
    inputs: {model: train, data: "file:corpus"}
    params: {domains: [latex, wikipedia], eval_tokens: 1024, threads: 1}
"#;

/// A workspace with the fixture corpus and [`PIPELINE`] as `train.yaml`.
fn fixture_workspace() -> (Workspace, PathBuf) {
    let ws = Workspace::new();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    copy_dir(
        &repo.join("tests/fixtures/corpus"),
        &ws.path().join("corpus"),
    );
    let pipeline = ws.write("train.yaml", PIPELINE);
    (ws, pipeline)
}

/// Training processes (`autoscale-train job`) whose job lies under `dir`.
fn trainings_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("test setup").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("autoscale-train") && cmdline.contains(&*dir.to_string_lossy()) {
            found.push(cmdline);
        }
    }
    found
}

fn checkpoint_in(cache: &Path) -> Option<PathBuf> {
    let scratch = cache.join("v1/scratch");
    std::fs::read_dir(scratch)
        .ok()?
        .flatten()
        .map(|e| e.path().join("checkpoint.json"))
        .find(|p| p.is_file())
}

#[test]
fn a_killed_training_resumes_from_its_checkpoint_and_eval_scores_held_out_domains() {
    if common::trainer().is_none() {
        return;
    }
    let (ws, pipeline) = fixture_workspace();
    let p = pipeline.to_str().unwrap();

    // Kill autoscale (SIGKILL) once the training has written a checkpoint.
    let mut child = ws
        .cmd(&["--json", "run", p])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let checkpoint = loop {
        if let Some(c) = checkpoint_in(&ws.cache()) {
            break c;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "autoscale ended before the first checkpoint"
        );
        assert!(Instant::now() < deadline, "no checkpoint after 120 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let at: Value = serde_json::from_str(&std::fs::read_to_string(&checkpoint).unwrap()).unwrap();
    assert!(at["step"].as_u64().unwrap() >= 10, "{at}");
    // The training process dies with autoscale.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !trainings_under(ws.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "orphaned: {:?}",
            trainings_under(ws.path())
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The rerun resumes from a checkpoint and finishes; then `eval` runs on held-out domains.
    let out = ws.run(&["--json", "run", p]);
    let evs = events(&out);
    assert_eq!(out.status.code(), Some(0), "{}\n{evs:?}", stderr(&out));
    assert_eq!(with_outcome(&evs, "executed"), ["heldout", "train"]);
    let show = ws.run(&["--json", "show", p, "train"]);
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    let dir = PathBuf::from(shown["dir"].as_str().unwrap());
    let eval: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    let resumed = eval["train"]["resumed_from_step"].as_u64().unwrap_or(0);
    assert!(resumed >= 10, "resumed from {resumed}: {}", eval["train"]);
    assert_eq!(eval["train"]["steps"], 400);
    assert_eq!(eval["train"]["replicas"], 2);
    assert_eq!(
        eval["domains"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["books", "code", "web"]
    );
    assert!(dir.join("model/model.safetensors").is_file());
    // The stage's result says so too.
    assert_eq!(shown["metadata"]["result"]["resumed_from_step"], resumed);

    let show = ws.run(&["--json", "show", p, "heldout"]);
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    let dir = PathBuf::from(shown["dir"].as_str().unwrap());
    let held: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    let domains: Vec<&String> = held["domains"].as_object().unwrap().keys().collect();
    assert_eq!(domains, ["latex", "wikipedia"]);
    for d in ["latex", "wikipedia"] {
        let loss = held["domains"][d]["loss"].as_f64().unwrap();
        assert!(loss > 0.0 && loss < 5.0, "{d}: {loss}");
    }
    assert!(held["worst_ppl"].as_f64().unwrap() >= held["mean_ppl"].as_f64().unwrap());

    // Nothing left to do.
    let (code, evs) = ws.run_json(&[p]);
    assert_eq!(code, 0);
    assert!(with_outcome(&evs, "executed").is_empty(), "{evs:?}");
}

#[test]
fn bad_train_params_are_config_errors_with_hints() {
    let ws = Workspace::new();
    let p = ws.write(
        "bad.yaml",
        "name: bad\nstages:\n  - id: t\n    kind: train\n    inputs: {data: \"file:.\"}\n    params: {model: gpt-2, tokens: {a: 1}}\n",
    );
    let out = ws.run(&["run", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("unknown model preset `gpt-2`"), "{err}");
    assert!(err.contains("gpt2-medium"), "{err}");
}

/// The data stages feed the trainer: JSONL -> `prepare` -> `tokenizer` (BPE) -> `shard` (Arrow
/// IPC) -> `train` and `eval`, with the shards' vocabulary, held-out sets and byte counts.
#[test]
fn train_reads_the_shard_stage_output() {
    if common::trainer().is_none() {
        return;
    }
    let ws = Workspace::new();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/corpus");
    copy_dir(&fixture, &ws.path().join("corpus"));
    let p = ws.write(
        "shards.yaml",
        r#"
name: shards
stages:
  - id: prepare
    kind: prepare
    foreach: [books, code, web, latex]
    inputs: {source: "file:corpus/${item}.jsonl"}
    params: {min_chars: 200, block_chars: 0, val_fraction: 0.1, val_max_docs: 20}
  - id: tokenizer
    kind: tokenizer
    inputs: {docs: prepare}
    params: {method: bpe, vocab_size: 512, sample_docs: 200}
  - id: shard
    kind: shard
    inputs: {docs: prepare, tokenizer: tokenizer}
    params: {shard_tokens: 5000}
  - id: train
    kind: train
    inputs: {data: shard}
    params:
      model: gpt2-tiny
      weights: {books: 0.4, code: 0.4, web: 0.2}
      total_tokens: 81920
      seq_len: 64
      batch_size: 8
      lr: 0.003
      threads: 1
      eval_every: 0
      eval_tokens: 2048
      eval_domains: [books, code, web]
  - id: heldout
    kind: eval
    inputs: {model: train, data: shard}
    params: {domains: [latex], eval_tokens: 2048, threads: 1}
"#,
    );
    let p = p.to_str().unwrap();
    let (code, evs) = ws.run_json(&[p]);
    assert_eq!(code, 0, "{evs:?}");
    let eval_of = |stage: &str| -> Value {
        let show = ws.run(&["--json", "show", p, stage]);
        let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
        let dir = PathBuf::from(shown["dir"].as_str().unwrap());
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap()
    };
    let trained = eval_of("train");
    // 81,920 tokens of 64-token windows in batches of 8: 160 steps.
    assert_eq!(trained["train"]["steps"], 160, "{}", trained["train"]);
    let uniform = (512f64).ln();
    for d in ["books", "code", "web"] {
        let m = &trained["domains"][d];
        let loss = m["loss"].as_f64().unwrap();
        // Well below a uniform guess over the 512 ids: the model learned from the shards.
        assert!(loss.is_finite() && loss < uniform - 0.7, "{d}: {m}");
        // BPE tokens hold more than a byte each.
        assert!(m["bpb"].as_f64().unwrap() > 0.0, "{d}: {m}");
    }
    let held = eval_of("heldout");
    assert!(
        held["domains"]["latex"]["loss"].as_f64().unwrap() < uniform,
        "{held}"
    );
}

/// Without a trainer, a train pipeline still plans (its key names the trainer's implementation
/// and libtorch, compiled into `autoscale`), and running it fails the stage with the build command.
#[test]
fn without_a_trainer_train_stages_plan_and_fail_with_the_build_hint() {
    let (ws, pipeline) = fixture_workspace();
    let p = pipeline.to_str().unwrap();
    let missing = ws.path().join("nowhere/autoscale-train");
    let out = ws
        .cmd(&["--json", "status", p])
        .env("AUTOSCALE_TRAINER", &missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = ws
        .cmd(&["--json", "explain", p, "train"])
        .env("AUTOSCALE_TRAINER", &missing)
        .output()
        .unwrap();
    let explained = String::from_utf8_lossy(&out.stdout);
    let libtorch = format!(
        "\"implementation\":\"tch 0.26.0, libtorch {}\"",
        autoscale_train::LIBTORCH_VERSION
    );
    assert!(explained.contains(&libtorch), "{explained}");
    let out = ws
        .cmd(&["--json", "run", p])
        .env("AUTOSCALE_TRAINER", &missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(text.contains("cannot start"), "{text}");
    assert!(
        text.contains("LIBTORCH_USE_PYTORCH=1 cargo build"),
        "{text}"
    );
}

/// A trainer asked to run for an `autoscale` that keys on another identity refuses, naming
/// both, before it reads the job.
#[test]
fn a_trainer_built_from_other_code_refuses_the_job() {
    let Some(trainer) = common::trainer() else {
        return;
    };
    let ws = Workspace::new();
    let job = ws.write("job.json", "{}");
    let out = std::process::Command::new(&trainer)
        .args(["job", job.to_str().unwrap(), "--identity"])
        .arg("trainer 0000000000000000 libtorch 2.13.0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said: Value = serde_json::from_slice(&out.stdout).unwrap();
    let message = said["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("trainer 0000000000000000"), "{said}");
    let mine = std::process::Command::new(&trainer)
        .arg("identity")
        .output()
        .unwrap();
    let mine = String::from_utf8_lossy(&mine.stdout);
    assert!(message.contains(mine.trim()), "{said}");
    assert!(
        said["error"]["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("cargo build"),
        "{said}"
    );
}

/// A training that asks for a GPU and one command stage that does, on a machine without one.
const GPU_FALLBACK: &str = r#"
name: gpu-fallback
stages:
  - id: train
    kind: train
    inputs: {data: "file:corpus"}
    resources: {gpus: 1}
    params:
      model: gpt2-tiny
      model_overrides: {n_layer: 1}
      tokens: {books: 4096}
      seq_len: 32
      batch_size: 4
      threads: 1
      eval_every: 0
      eval_tokens: 512
  - id: tool
    kind: command
    resources: {gpus: 1}
    cmd: "echo hi > $AUTOSCALE_OUT/x"
"#;

/// `status --json` as stage -> state.
fn states(out: &std::process::Output) -> Vec<(String, String)> {
    events(out)
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap_or_default().to_string(),
                s["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// With no GPU, a training that asks for one runs on the CPU, keyed `cpu fp32`; a machine with
/// GPUs (here `CUDA_VISIBLE_DEVICES`, as a Slurm allocation sets it) would train in bf16, so it
/// is not served that result, nor would a Slurm job be: `status` leaves the stamp and says it
/// would rerun, and `explain` says why. A `command` stage's key does not depend on the device.
#[test]
fn a_cpu_fallback_training_is_not_served_to_a_run_with_gpus() {
    if common::trainer().is_none() {
        return;
    }
    let ws = Workspace::new();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    copy_dir(
        &repo.join("tests/fixtures/corpus"),
        &ws.path().join("corpus"),
    );
    let pipeline = ws.write("gpu.yaml", GPU_FALLBACK);
    let p = pipeline.to_str().unwrap();
    let out = ws.run(&["--json", "run", p]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(with_outcome(&events(&out), "executed"), ["tool", "train"]);

    let cached = |s: &[(String, String)]| s.iter().all(|(_, state)| state == "cached");
    let here = ws.run(&["--json", "status", p]);
    assert!(cached(&states(&here)), "{:?}", states(&here));
    let none = ws.run(&["--json", "status", "--gpus", "none", p]);
    assert!(cached(&states(&none)), "{:?}", states(&none));

    let with_gpus = |args: &[&str]| {
        ws.cmd(args)
            .env("CUDA_VISIBLE_DEVICES", "0")
            .output()
            .unwrap()
    };
    // Through Slurm (here chosen by the environment, on a head with no GPU) stages get the
    // GPUs they ask for: `status` keys them as `run --executor slurm` would.
    let through_slurm = ws
        .cmd(&["--json", "status", p])
        .env("AUTOSCALE_EXECUTOR", "slurm")
        .output()
        .unwrap();
    for out in [
        with_gpus(&["--json", "status", p]),
        ws.run(&["--json", "status", "--gpus", "0", p]),
        through_slurm,
    ] {
        let s = states(&out);
        assert_eq!(
            s,
            [
                ("train".to_string(), "will_run".to_string()),
                ("tool".to_string(), "cached".to_string())
            ],
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let why = with_gpus(&["explain", p, "train"]);
    let text = String::from_utf8_lossy(&why.stdout);
    assert!(
        text.contains("device changed: cpu fp32 -> cuda bf16-matmul fp32-master"),
        "{text}"
    );
}
