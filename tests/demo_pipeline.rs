//! The demo pipelines end to end at smoke size: corpus (fixture), tokenizer and shards, DDO at two
//! scales with the planned fan-out, the predictor, target trainings, report; then a second run
//! executes nothing, and a new target budget reruns only what depends on it.
//!
//! `pipelines/tiny.yaml` (the embedded default) trains the tiny GPT-2 on libtorch, so its test
//! needs the `torch` feature; `pipelines/tiny_ngram.yaml` is the same method with the n-gram
//! trainer and runs in every build.

mod common;

use std::path::Path;

use common::{Workspace, stderr, with_outcome};
use serde_json::Value;

/// Runs `pipeline --with overlay` end to end, checks the fan-out, the report and the reruns, and
/// returns the report's directory contents as (report.md, results.json).
fn demo(ws: &Workspace, pipeline: &str, overlay: &str, new_budget: &str) -> (String, Value) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (pipeline, overlay) = (repo.join(pipeline), repo.join(overlay));
    let (p, o) = (
        pipeline.to_str().expect("utf8"),
        overlay.to_str().expect("utf8"),
    );
    let (code, events) = ws.run_json(&[p, "--with", o]);
    let failed: Vec<_> = events.iter().filter(|e| e["outcome"] == "failed").collect();
    assert_eq!(code, 0, "failures: {failed:?}");
    let executed = with_outcome(&events, "executed");
    // 7 domains: 1 + 2 * 7 proxy runs at each of two scales, 4 mixtures x 2 seeds.
    let count = |prefix: &str| executed.iter().filter(|s| s.starts_with(prefix)).count();
    assert_eq!(count("proxy_small["), 15, "{executed:?}");
    assert_eq!(count("proxy_large["), 15, "{executed:?}");
    assert_eq!(count("target["), 8, "{executed:?}");

    let show = ws.run(&["--json", "show", p, "report", "--with", o]);
    assert_eq!(show.status.code(), Some(0), "{}", stderr(&show));
    let shown: Value = serde_json::from_slice(&show.stdout).expect("json");
    let dir = Path::new(shown["dir"].as_str().expect("dir"));
    let report = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    assert!(report.contains("AutoScale"), "{report}");
    assert!(dir.join("report.html").is_file());
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).expect("results"))
            .expect("json");

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
        8
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
    );
    assert!(report.contains("| AutoScale |"), "{report}");
}

#[cfg(feature = "torch")]
#[test]
fn the_tiny_gpt_smoke_pipeline_runs_end_to_end_and_a_rerun_executes_nothing() {
    let ws = Workspace::new();
    let (report, _) = demo(&ws, "pipelines/tiny.yaml", "pipelines/smoke.yaml", "80000");
    assert!(report.contains("AutoScale"), "{report}");
}
