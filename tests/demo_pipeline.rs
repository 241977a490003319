//! The demo pipeline end to end at smoke size: corpus (fixture), DDO at two scales with run-time
//! fan-out, the predictor, target trainings, report; then a second run executes nothing.

mod common;

use std::path::Path;

use common::{Workspace, stderr, with_outcome};

#[test]
fn the_smoke_pipeline_runs_end_to_end_and_a_rerun_executes_nothing() {
    let ws = Workspace::new();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pipeline = repo.join("pipelines/tiny.yaml");
    let overlay = repo.join("pipelines/smoke.yaml");
    let (p, o) = (
        pipeline.to_str().expect("utf8"),
        overlay.to_str().expect("utf8"),
    );
    let (code, events) = ws.run_json(&[p, "--with", o]);
    let failed: Vec<_> = events.iter().filter(|e| e["outcome"] == "failed").collect();
    assert_eq!(code, 0, "failures: {failed:?}");
    let executed = with_outcome(&events, "executed");
    // 7 domains: 1 + 2 * 7 proxy runs at each of two scales, 8 target runs.
    assert_eq!(
        executed
            .iter()
            .filter(|s| s.starts_with("proxy_small["))
            .count(),
        15
    );
    assert_eq!(
        executed
            .iter()
            .filter(|s| s.starts_with("proxy_large["))
            .count(),
        15
    );
    assert_eq!(
        executed.iter().filter(|s| s.starts_with("target[")).count(),
        8
    );

    let show = ws.run(&["--json", "show", p, "report", "--with", o]);
    assert_eq!(show.status.code(), Some(0), "{}", stderr(&show));
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).expect("json");
    let dir = Path::new(shown["dir"].as_str().expect("dir"));
    let report = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    assert!(
        report.contains("## Validation loss at the target scale"),
        "{report}"
    );
    assert!(report.contains("| AutoScale |"), "{report}");
    assert!(dir.join("report.html").exists());
    let weights: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).expect("results"))
            .expect("json");
    let auto: f64 = weights["weights"]["AutoScale"]
        .as_object()
        .expect("autoscale weights")
        .values()
        .filter_map(|v| v.as_f64())
        .sum();
    assert!(
        (auto - 1.0).abs() < 1e-6,
        "AutoScale weights sum to 1, got {auto}"
    );

    let (code, events) = ws.run_json(&[p, "--with", o]);
    assert_eq!(code, 0);
    assert!(
        with_outcome(&events, "executed").is_empty(),
        "a rerun executes nothing"
    );
    // Changing the target budget reruns only the predictor, the target trainings and the report.
    let (code, events) = ws.run_json(&[p, "--with", o, "--set", "target_tokens=200000"]);
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
}
