//! The paper's pipelines plan offline: `status` and `dag` on `pipelines/gpt2_large.yaml` and
//! `pipelines/bert_base.yaml` touch no network and no GPU, and list every proxy training DDO
//! will run (the `ddo_plan` fan-out is planned from its params), in any build.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{Workspace, stderr};
use serde_json::Value;

fn pipeline(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("pipelines")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// `status --json`: every stage's id, kind and state.
fn status(ws: &Workspace, file: &str) -> Vec<Value> {
    let out = ws.run(&["--json", "status", file]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Stage count per template (`proxy_small[c4-x3]` -> `proxy_small`) and kind.
fn counts(stages: &[Value]) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for s in stages {
        let id = s["stage"].as_str().expect("stage id");
        let template = id.split('[').next().expect("id").to_string();
        let kind = s["kind"].as_str().expect("kind").to_string();
        *counts.entry((template, kind)).or_insert(0) += 1;
    }
    counts
}

fn count(counts: &BTreeMap<(String, String), usize>, template: &str, kind: &str) -> usize {
    counts
        .get(&(template.to_string(), kind.to_string()))
        .copied()
        .unwrap_or(0)
}

#[test]
fn gpt2_large_plans_offline_with_every_proxy_training() {
    let ws = Workspace::new();
    let file = pipeline("gpt2_large.yaml");
    let stages = status(&ws, &file);
    let c = counts(&stages);
    // DDO at 0.3B, 0.6B (the predictor's held-out check) and 1.2B: 1 base + 7 domains x 2
    // multipliers each.
    for scale in ["proxy_small", "proxy_check", "proxy_large"] {
        assert_eq!(count(&c, scale, "train"), 15, "{scale}: {c:?}");
    }
    let proxies: usize = ["proxy_small", "proxy_check", "proxy_large"]
        .iter()
        .map(|s| count(&c, s, "train"))
        .sum();
    assert_eq!(proxies, 45);
    assert_eq!(count(&c, "download_c4", "download"), 1);
    assert_eq!(count(&c, "prepare", "prepare"), 7);
    // Predictions for 3B, 5B and 10B and the 0.6B check; at each target scale three trainings
    // (AutoScale, uniform, LLaMA), their evals and a report.
    for scale in ["3b", "5b", "10b"] {
        assert_eq!(count(&c, &format!("predict_{scale}"), "predict"), 1);
        assert_eq!(count(&c, &format!("target_{scale}"), "train"), 3, "{c:?}");
        assert_eq!(count(&c, &format!("eval_{scale}"), "eval"), 3, "{c:?}");
        assert_eq!(count(&c, &format!("report_{scale}"), "report"), 1);
    }
    assert_eq!(count(&c, "predict_check", "predict"), 1);
    assert!(
        stages.iter().any(|s| s["stage"] == "target_10b[llama]"),
        "{stages:?}"
    );
    // Nothing has run: every stage is to run or waits, and a planned proxy says why.
    assert!(stages.iter().all(|s| s["state"] != "cached"), "{stages:?}");
    let base = stages
        .iter()
        .find(|s| s["stage"] == "proxy_small[base]")
        .expect("the base run of the 0.3B DDO is planned");
    assert_ne!(base["state"], "cached");

    // The DAG, planned fan-out included.
    let out = ws.run(&["dag", &file, "--format", "mermaid"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let dag = String::from_utf8_lossy(&out.stdout);
    assert!(dag.contains("proxy_large[base]"), "{dag}");
    assert!(dag.contains("ddo_large"), "{dag}");
    let out = ws.run(&["dag", &file]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("digraph"));
}

#[test]
fn bert_base_plans_offline_with_every_proxy_training() {
    let ws = Workspace::new();
    let stages = status(&ws, &pipeline("bert_base.yaml"));
    let c = counts(&stages);
    // 5 training domains, multipliers 1/3 and 2: 1 + 5 x 2 per scale.
    assert_eq!(count(&c, "proxy_small", "train"), 11, "{c:?}");
    assert_eq!(count(&c, "proxy_large", "train"), 11, "{c:?}");
    // 8 domains prepared and sharded, 3 of them evaluation-only.
    assert_eq!(count(&c, "prepare", "prepare"), 8);
    assert_eq!(count(&c, "target", "train"), 2);
    assert_eq!(count(&c, "eval", "eval"), 2);
    assert_eq!(count(&c, "report", "report"), 1);
    let perturbed: Vec<&str> = stages
        .iter()
        .filter_map(|s| s["stage"].as_str())
        .filter(|id| id.starts_with("proxy_small["))
        .collect();
    for domain in ["amazon", "arxiv", "books", "wikipedia", "openwebtext"] {
        assert_eq!(
            perturbed.iter().filter(|id| id.contains(domain)).count(),
            2,
            "{domain} is scaled down and up: {perturbed:?}"
        );
    }
    assert!(!perturbed.iter().any(|id| id.contains("pubmed")));
}

#[test]
fn a_planned_fanout_is_what_the_run_then_expands() {
    // The children `status` plans before the source runs are the ones the run creates, down to
    // their keys (sevenths as weights: the planned params must equal what the run's fanout.json
    // reads back).
    let ws = Workspace::new();
    let file = ws.write(
        "plan.yaml",
        r#"
name: plan
stages:
  - id: plan
    kind: ddo_plan
    params: {domains: [a, b, c, d, e, f, g], base_tokens: 1000, multipliers: [0.2, 3]}
  - id: child
    kind: command
    fanout: plan
    cmd: 'echo "$AUTOSCALE_PARAM_TOTAL_TOKENS" > "$AUTOSCALE_OUT/t"'
"#,
    );
    let file = file.to_str().expect("utf8");
    let before: Vec<String> = status(&ws, file)
        .iter()
        .filter_map(|s| s["stage"].as_str().map(str::to_string))
        .collect();
    assert_eq!(before.len(), 16, "{before:?}");
    let (code, events) = ws.run_json(&[file]);
    assert_eq!(code, 0);
    let mut ran = common::with_outcome(&events, "executed");
    ran.retain(|id| id.starts_with("child["));
    let mut planned: Vec<String> = before
        .into_iter()
        .filter(|id| id.starts_with("child["))
        .collect();
    planned.sort();
    assert_eq!(ran, planned);
    assert!(
        status(&ws, file).iter().all(|s| s["state"] == "cached"),
        "after the run every planned stage is cached"
    );
}

#[test]
fn yaml_1_1_booleans_stay_strings() {
    // YAML 1.2's core schema: `y`, `no`, `on`, `off` are the names they look like, not booleans
    // (which would also make two `foreach` items collide as `true`).
    let ws = Workspace::new();
    ws.write(
        "p.yaml",
        r#"
name: booleans
stages:
  - id: flag
    kind: command
    foreach: [y, n, on, off, yes, no, true]
    cmd: "echo ${item} > $AUTOSCALE_OUT/x"
"#,
    );
    let ids: Vec<String> = status(&ws, "p.yaml")
        .iter()
        .map(|s| s["stage"].as_str().expect("stage id").to_string())
        .collect();
    for item in ["y", "n", "on", "off", "yes", "no", "true"] {
        assert!(ids.contains(&format!("flag[{item}]")), "{item}: {ids:?}");
    }
}

#[test]
fn a_stages_slurm_settings_are_not_part_of_its_key() {
    // Where a result was computed does not change it: moving a stage to another partition
    // keeps its cached result.
    let ws = Workspace::new();
    let stage =
        "name: k\nstages:\n  - id: a\n    kind: command\n    cmd: \"echo hi > $AUTOSCALE_OUT/x\"\n";
    ws.write("plain.yaml", stage);
    ws.write(
        "placed.yaml",
        &format!(
            "{stage}    slurm: {{partition: gpu, time: \"1:00:00\", extra: [\"--constraint=h100\"]}}\n"
        ),
    );
    let key = |file: &str| status(&ws, file)[0]["key"].clone();
    assert_eq!(key("plain.yaml"), key("placed.yaml"));
    ws.write(
        "typo.yaml",
        &format!("{stage}    slurm: {{partiton: gpu}}\n"),
    );
    let out = ws.run(&["status", "typo.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("partiton"), "{}", stderr(&out));
}
