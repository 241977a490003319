//! The demo pipelines end to end at smoke size: corpus (fixture), tokenizer and shards, DDO at two
//! scales with the planned fan-out, the predictor, target trainings, report; then a second run
//! executes nothing, and a new target budget reruns only what depends on it.
//!
//! `pipelines/tiny.yaml` (the embedded default) trains the tiny GPT-2 on libtorch, so its test
//! needs the trainer binary (`cargo test --workspace`); `pipelines/tiny_ngram.yaml` is the same
//! method with the n-gram trainer and runs in every build.

mod common;

use std::path::{Path, PathBuf};

use common::{Workspace, stderr, with_outcome};
use serde_json::Value;

/// How many stages of each fanned-out group a pipeline runs.
struct Fanout {
    /// Proxy trainings per DDO scale: base seeds + 2 per domain.
    proxies: usize,
    targets: usize,
}

/// A cached stage's output folder (`autoscale show`), for the run `args` (file, then flags).
fn output_dir(ws: &Workspace, args: &[&str], stage: &str) -> PathBuf {
    let mut show_args = vec!["--json", "show", args[0], stage];
    show_args.extend_from_slice(&args[1..]);
    let show = ws.run(&show_args);
    assert_eq!(show.status.code(), Some(0), "{}", stderr(&show));
    let shown: Value = serde_json::from_slice(&show.stdout).expect("json");
    PathBuf::from(shown["dir"].as_str().expect("dir"))
}

/// Runs `pipeline --with overlay...` end to end, checks the fan-out and the report, and returns
/// the report's directory contents as (report.md, results.json).
fn first_run(ws: &Workspace, args: &[&str], fanout: &Fanout) -> (String, Value) {
    let (code, events) = ws.run_json(args);
    let failed: Vec<_> = events.iter().filter(|e| e["outcome"] == "failed").collect();
    assert_eq!(code, 0, "failures: {failed:?}");
    let executed = with_outcome(&events, "executed");
    let count = |prefix: &str| executed.iter().filter(|s| s.starts_with(prefix)).count();
    assert_eq!(count("proxy_small["), fanout.proxies, "{executed:?}");
    assert_eq!(count("proxy_large["), fanout.proxies, "{executed:?}");
    assert_eq!(count("target["), fanout.targets, "{executed:?}");

    let dir = output_dir(ws, args, "report");
    let report = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    assert!(report.contains("AutoScale"), "{report}");
    assert!(dir.join("report.html").is_file());
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).expect("results"))
            .expect("json");
    (report, results)
}

/// [`first_run`], then: a second run executes nothing, and a new target budget reruns only the
/// predictor, the target trainings and the report.
fn demo(
    ws: &Workspace,
    pipeline: &str,
    overlay: &str,
    new_budget: &str,
    fanout: Fanout,
) -> (String, Value) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (pipeline, overlay) = (repo.join(pipeline), repo.join(overlay));
    let (p, o) = (
        pipeline.to_str().expect("utf8"),
        overlay.to_str().expect("utf8"),
    );
    let (report, results) = first_run(ws, &[p, "--with", o], &fanout);
    let (code, events) = ws.run_json(&[p, "--with", o]);
    assert_eq!(code, 0);
    assert!(
        with_outcome(&events, "executed").is_empty(),
        "a rerun executes nothing"
    );
    // Changing the target budget reruns only the predictor, the target trainings and the report.
    let set = format!("target_tokens={new_budget}");
    let (code, events) = ws.run_json(&[p, "--with", o, "--set", &set]);
    assert_eq!(code, 0);
    let mut rerun = with_outcome(&events, "executed");
    rerun.retain(|s| !s.starts_with("target["));
    assert_eq!(rerun, ["predict", "report"]);
    assert_eq!(
        with_outcome(&events, "executed")
            .iter()
            .filter(|s| s.starts_with("target["))
            .count(),
        fanout.targets
    );
    (report, results)
}

#[test]
fn the_ngram_smoke_pipeline_runs_end_to_end_and_a_rerun_executes_nothing() {
    let ws = Workspace::new();
    let (report, _) = demo(
        &ws,
        "pipelines/tiny_ngram.yaml",
        "pipelines/smoke_ngram.yaml",
        "200000",
        // 7 domains: 1 + 2 * 7 proxy runs at each of two scales; 4 mixtures x 2 seeds.
        Fanout {
            proxies: 15,
            targets: 8,
        },
    );
    assert!(report.contains("| AutoScale |"), "{report}");
}

#[test]
fn the_tiny_gpt_smoke_pipeline_runs_end_to_end_and_a_rerun_executes_nothing() {
    if common::trainer().is_none() {
        return;
    }
    let ws = Workspace::new();
    // 7 domains: 2 base seeds + 2 * 7 proxy runs at each of two scales; 3 mixtures x 3 seeds.
    let (report, _) = demo(
        &ws,
        "pipelines/tiny.yaml",
        "pipelines/smoke.yaml",
        "80000",
        Fanout {
            proxies: 16,
            targets: 9,
        },
    );
    assert!(report.contains("AutoScale"), "{report}");
}

/// Whether `python3` (the one a `command` stage runs) has what examples/trainers/hf_clm.py needs.
/// Skips loudly, unless CI requires the check (`AUTOSCALE_REQUIRE_TRANSFORMERS`).
fn python_has_transformers() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import torch, transformers, pyarrow, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("AUTOSCALE_REQUIRE_TRANSFORMERS").is_none(),
            "AUTOSCALE_REQUIRE_TRANSFORMERS is set, but python3 cannot import torch, transformers, pyarrow and numpy"
        );
        eprintln!("skipped: python3 cannot import torch, transformers, pyarrow and numpy");
    }
    ok
}

/// The method with a trainer users bring: pipelines/tiny_hf.yaml trains every proxy and target
/// with examples/trainers/hf_clm.py (GPT-2 on `transformers`) through the `command` kind; the
/// DDO, predictor and report stages read its eval.json as they read the built-in trainer's.
#[test]
fn the_method_runs_with_the_hugging_face_trainer_in_place_of_the_built_in_one() {
    if !python_has_transformers() {
        return;
    }
    let ws = Workspace::new();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pipeline = repo.join("pipelines/tiny_hf.yaml");
    let smoke = repo.join("pipelines/smoke.yaml");
    // Three of the seven domains in the mixture (all seven are still scored): 2 base seeds + 2 x 3
    // perturbed runs per scale, each a Python process that imports torch and transformers.
    let three = ws.write("three.yaml", "params: {domains: [books, code, web]}\n");
    let args = [
        pipeline.to_str().expect("utf8"),
        "--with",
        smoke.to_str().expect("utf8"),
        "--with",
        three.to_str().expect("utf8"),
    ];
    let (report, results) = first_run(
        &ws,
        &args,
        &Fanout {
            proxies: 8,
            targets: 9,
        },
    );
    assert!(report.contains("hf_clm.py"), "{report}");
    assert!(results.is_object(), "{results}");

    // A proxy trained on exactly the tokens DDO planned for it, and scored every domain.
    let dir = output_dir(&ws, &args, "proxy_small[code-x3]");
    let eval: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).expect("eval.json"))
            .expect("json");
    let budget = eval["train"]["budget"].as_object().expect("budget");
    let planned: u64 = budget.values().filter_map(Value::as_u64).sum();
    assert_eq!(budget.len(), 3, "{eval}");
    assert!(
        budget["code"].as_u64() > budget["books"].as_u64(),
        "code scaled up: {eval}"
    );
    assert!(planned > 0, "{eval}");
    assert_eq!(
        eval["domains"].as_object().expect("domains").len(),
        7,
        "{eval}"
    );

    let (code, events) = ws.run_json(&args);
    assert_eq!(code, 0);
    assert!(
        with_outcome(&events, "executed").is_empty(),
        "a rerun executes nothing"
    );
}

/// A pipeline in which one domain's data only hurts: DDO at two scales with a synthetic trainer
/// (a known loss per domain, a tiny seed-dependent jitter so three base seeds measure a noise),
/// the predictor and nothing else. The pipeline completes, the domain sits on the bound with the
/// warning in `--json` output, and the prediction carries intervals.
#[test]
fn a_domain_whose_data_only_hurts_gets_the_bound_and_the_pipeline_completes() {
    let ws = Workspace::new();
    // Loss per eval domain k: 3 + 2 (N_k/1000 + 0.5)^(-0.4) + 0.02 N_junk/1000, in nats; the
    // `junk` domain has no term of its own, so more of it only raises every loss.
    ws.write(
        "trainer.py",
        r#"import json, os, math, random
p = json.loads(os.environ["AUTOSCALE_PARAMS_JSON"])
tokens = p["tokens"]
jitter = random.Random(int(p.get("seed", 0))).uniform(-1, 1) * 0.003
junk = tokens["junk"] / 1000.0
losses = {d: 3 + 2 * (tokens[d] / 1000.0 + 0.5) ** -0.4 + 0.02 * junk + jitter
          for d in ["a", "b", "junk"] if d != "junk"}
losses["junk"] = 4.0 + 0.02 * junk + jitter
json.dump({"domains": {d: {"loss": l, "ppl": math.exp(l)} for d, l in losses.items()}},
          open(os.path.join(os.environ["AUTOSCALE_OUT"], "eval.json"), "w"))
"#,
    );
    let pipeline = ws.write(
        "flat.yaml",
        r#"name: flat
stages:
  - id: plan_small
    kind: ddo_plan
    params: {domains: [a, b, junk], base_tokens: 3000, base_seeds: 3}
  - id: plan_large
    kind: ddo_plan
    params: {domains: [a, b, junk], base_tokens: 9000, base_seeds: 3}
  - id: proxy_small
    kind: command
    fanout: plan_small
    inputs: {trainer: file:trainer.py}
    cmd: python3 "$AUTOSCALE_INPUT_TRAINER"
  - id: proxy_large
    kind: command
    fanout: plan_large
    inputs: {trainer: file:trainer.py}
    cmd: python3 "$AUTOSCALE_INPUT_TRAINER"
  - id: ddo_small
    kind: ddo
    inputs: {runs: proxy_small, plan: plan_small}
  - id: ddo_large
    kind: ddo
    inputs: {runs: proxy_large, plan: plan_large}
  - id: predict
    kind: predict
    inputs: {small: ddo_small, large: ddo_large}
    params: {target_tokens: 27000, bootstrap: 100}
"#,
    );
    let p = pipeline.to_str().expect("utf8");
    let (code, events) = ws.run_json(&[p]);
    let failed: Vec<_> = events.iter().filter(|e| e["outcome"] == "failed").collect();
    assert_eq!(code, 0, "failures: {failed:?}");
    for stage in ["ddo_small", "ddo_large"] {
        let show = ws.run(&["--json", "show", p, stage]);
        assert_eq!(show.status.code(), Some(0), "{}", stderr(&show));
        let shown: Value = serde_json::from_slice(&show.stdout).expect("json");
        let warnings = shown["metadata"]["result"]["warnings"].to_string();
        assert!(
            warnings.contains("no measurable benefit"),
            "{stage}: {warnings}"
        );
        assert!(
            shown["metadata"]["result"]["noise"]["sigma"]
                .as_f64()
                .is_some()
        );
        let dir = Path::new(shown["dir"].as_str().expect("dir"));
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("weights.json")).expect("read"))
                .expect("json");
        let junk = report["domains"]
            .as_array()
            .expect("domains")
            .iter()
            .find(|d| d["name"] == "junk")
            .expect("junk");
        assert_eq!(junk["flat"], true, "{junk}");
        assert_eq!(junk["on_bound"], true, "{junk}");
    }
    let show = ws.run(&["--json", "show", p, "predict"]);
    let shown: Value = serde_json::from_slice(&show.stdout).expect("json");
    let dir = Path::new(shown["dir"].as_str().expect("dir"));
    let prediction: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("weights.json")).expect("read"))
            .expect("json");
    for d in prediction["domains"].as_array().expect("domains") {
        let interval = d["interval"].as_array().expect("an interval per weight");
        let (lo, hi, w) = (
            interval[0].as_f64().expect("lo"),
            interval[1].as_f64().expect("hi"),
            d["weight"].as_f64().expect("weight"),
        );
        assert!(lo <= hi && lo >= 0.0 && hi <= 1.0, "{d}");
        // The point estimate lies in (or at the edge of) its own interval, give or take rounding.
        assert!(lo - 1e-3 <= w && w <= hi + 1e-3, "{d}");
    }
}
