//! `autoscale mix` end to end: CSV and weights files in, tables and JSON out, bad input exits 2
//! with an error a person can act on.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mix")
        .join(name)
}

fn autoscale(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_autoscale"))
        .args(args)
        .env_remove("AUTOSCALE_CACHE_DIR")
        .output()
        .expect("run autoscale")
}

/// Runs with `--json`, expects success and one JSON object on stdout.
fn autoscale_json(args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend(args);
    let out = autoscale(&all);
    assert!(
        out.status.success(),
        "autoscale {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The optimum the fixture was generated with (its second comment line).
fn true_optimum() -> Vec<(String, f64)> {
    let text = std::fs::read_to_string(fixture("ddo_results.csv")).expect("fixture");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("# true optimum: "))
        .expect("the fixture states its optimum");
    line.split(", ")
        .map(|pair| {
            let (d, w) = pair.split_once('=').expect("domain=weight");
            (d.to_owned(), w.parse().expect("weight"))
        })
        .collect()
}

#[test]
fn ddo_recovers_the_synthetic_optimum() {
    let csv = fixture("ddo_results.csv");
    let report = autoscale_json(&[
        "mix",
        "ddo",
        "--results",
        csv.to_str().expect("utf-8 path"),
        "--tokens",
        "300M",
    ]);
    let weights = report["weights"].as_object().expect("weights");
    let sum: f64 = weights.values().map(num).sum();
    assert!((sum - 1.0).abs() < 1e-9, "weights sum to {sum}");
    let domains = report["domains"].as_array().expect("domains");
    assert_eq!(domains.len(), 3, "held_out is evaluated, not weighted");
    for d in domains {
        for key in ["a", "b", "c"] {
            assert!(num(&d["fit"][key]).is_finite(), "{d}");
        }
        assert!(
            (num(&d["tokens"]) - num(&d["weight"]) * 3e8).abs() < 1.0,
            "{d}"
        );
    }
    for (domain, truth) in true_optimum() {
        let got = num(&weights[&domain]);
        assert!((got - truth).abs() < 1e-3, "{domain}: {got} vs {truth}");
    }
    assert_eq!(report["eval_only_domains"][0], "held_out");

    // The table names each domain and the objective.
    let out = autoscale(&["mix", "ddo", "--results", csv.to_str().expect("utf-8 path")]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("github") && table.contains("objective mean-perplexity"),
        "{table}"
    );
}

#[test]
fn predict_from_two_weight_files_hits_the_target_total() {
    let dir = tempfile::tempdir().expect("temp dir");
    let small = dir.path().join("small.json");
    let large = dir.path().join("large.json");
    // One plain map, one DDO-style file: both are weights files.
    std::fs::write(&small, r#"{"books": 0.5, "c4": 0.3, "github": 0.2}"#).expect("write");
    std::fs::write(
        &large,
        r#"{"scale_tokens": 3e8, "weights": {"books": 0.45, "c4": 0.38, "github": 0.17}}"#,
    )
    .expect("write");
    let at_small = format!("100M={}", small.display());
    // The DDO-style file records its total, so it may stand alone.
    let at_large = large.display().to_string();
    let p = autoscale_json(&[
        "mix", "predict", "--at", &at_small, "--at", &at_large, "--target", "3B",
    ]);
    let total: f64 = p["tokens"]
        .as_object()
        .expect("tokens")
        .values()
        .map(num)
        .sum();
    assert!((total / 3e9 - 1.0).abs() < 1e-6, "tokens total {total}");
    let weights: f64 = p["weights"]
        .as_object()
        .expect("weights")
        .values()
        .map(num)
        .sum();
    assert!((weights - 1.0).abs() < 1e-9);
    // The trend continues: books falls further, c4 grows.
    assert!(
        num(&p["weights"]["books"]) < 0.45 && num(&p["weights"]["c4"]) > 0.38,
        "{p}"
    );

    let lone_small = small.display().to_string();
    let out = autoscale(&[
        "mix",
        "predict",
        "--at",
        &lone_small,
        "--at",
        &at_large,
        "--steps",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2), "a plain map records no total");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("small.json") && err.contains("--at TOKENS="),
        "{err}"
    );

    let out = autoscale(&["mix", "predict", "--at", &at_small, "--target", "3B"]);
    assert_eq!(out.status.code(), Some(2), "one scale is not enough");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("at least two") && err.contains("hint:"),
        "{err}"
    );
}

#[test]
fn bad_csv_exits_2_naming_the_line_with_a_hint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let csv = dir.path().join("bad.csv");
    std::fs::write(
        &csv,
        "perturbed,multiplier,books,c4\n,1,20,30\nbooks,0.2,twenty,31\nbooks,3,18,29\n",
    )
    .expect("write");
    let out = autoscale(&["mix", "ddo", "--results", csv.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.csv"), "names the file: {err}");
    assert!(
        err.contains("line 3") && err.contains("twenty"),
        "names the line and value: {err}"
    );
    assert!(err.contains("hint: "), "{err}");

    let out = autoscale(&["mix", "ddo", "--results", "/nonexistent/results.csv"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/results.csv"));
}

#[test]
fn plan_and_baselines() {
    let plan = autoscale_json(&[
        "mix",
        "plan",
        "--domains",
        "books,c4,github",
        "--tokens",
        "3e8",
    ]);
    let runs = plan["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 7, "1 + 2m runs");
    assert_eq!(runs[2]["id"], "books-x3");
    assert_eq!(num(&runs[2]["tokens"]["books"]), 3e8);

    let natural = autoscale_json(&["mix", "baseline", "natural", "--available", "a=1B,b=3e9"]);
    assert_eq!(natural["method"], "natural");
    assert_eq!(num(&natural["weights"]["a"]), 0.25);

    let unimax = autoscale_json(&[
        "mix",
        "baseline",
        "unimax",
        "--available",
        "a=1e6,b=1e9",
        "--budget",
        "1e8",
        "--max-epochs",
        "2",
    ]);
    assert!(
        (num(&unimax["weights"]["a"]) - 0.02).abs() < 1e-12,
        "{unimax}"
    );

    let out = autoscale(&["mix", "baseline", "unimax", "--available", "a=1e6"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs `budget`"));
}

/// A trainer stand-in: the fixture's synthetic law, from the fan-out params the command kind
/// passes as env variables (the base run has no `perturbed`).
const TRAIN_SH: &str = r#"awk -v p="$AUTOSCALE_PARAM_PERTURBED" -v m="$AUTOSCALE_PARAM_MULTIPLIER" 'BEGIN {
  split("books c4 github", d, " "); split("2 0.5 2", a, " "); split("1 3 3", b, " ")
  l = 1
  for (i = 1; i <= 3; i++) { n = (d[i] == p) ? m : 1; l += (n + a[i])^(-b[i]) - (1 + a[i])^(-b[i]) }
  l *= 20
  printf "{\"domains\": {\"books\": {\"ppl\": %.17g}, \"c4\": {\"ppl\": %.17g}, \"github\": {\"ppl\": %.17g}, \"held_out\": {\"loss\": %.17g}}}\n", l, l, l, log(l)
}' > "$AUTOSCALE_OUT/eval.json"
"#;

const MIX_PIPELINE: &str = "name: mix
stages:
  - id: plan_small
    kind: ddo_plan
    params: {domains: [books, c4, github], base_tokens: 300000000}
  - id: proxy_small
    kind: command
    fanout: plan_small
    cmd: sh train.sh
  - id: ddo_small
    kind: ddo
    inputs: {runs: proxy_small, plan: plan_small}
  - id: plan_large
    kind: ddo_plan
    params: {domains: [books, c4, github], base_tokens: 900000000}
  - id: proxy_large
    kind: command
    fanout: plan_large
    cmd: sh train.sh
  - id: ddo_large
    kind: ddo
    inputs: {runs: proxy_large, plan: plan_large}
  - id: predict
    kind: predict
    params: {target_tokens: 10000000000}
    inputs: {small: ddo_small, large: ddo_large}
";

#[test]
fn pipeline_plans_trains_fits_and_predicts() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("train.sh"), TRAIN_SH).expect("write");
    std::fs::write(dir.path().join("mix.yaml"), MIX_PIPELINE).expect("write");
    let cache = dir.path().join("cache");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_autoscale"))
            .arg("--cache-dir")
            .arg(&cache)
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("run autoscale")
    };
    let out = run(&["run", "mix.yaml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let output = |stage: &str, file: &str| -> Value {
        let out = run(&["--json", "show", "mix.yaml", stage]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let shown: Value = serde_json::from_slice(&out.stdout).expect("show json");
        let stage_dir = PathBuf::from(shown["dir"].as_str().expect("dir"));
        let text = std::fs::read_to_string(dir.path().join(stage_dir).join(file)).expect(file);
        serde_json::from_str(&text).expect("json")
    };
    let small = output("ddo_small", "weights.json");
    assert_eq!(num(&small["scale_tokens"]), 3e8);
    for (domain, truth) in true_optimum() {
        let got = num(&small["weights"][&domain]);
        assert!((got - truth).abs() < 1e-3, "{domain}: {got} vs {truth}");
    }
    // The law is scale-free in multipliers, so the optimum holds at every scale.
    let prediction = output("predict", "weights.json");
    assert!((num(&prediction["total_tokens"]) / 1e10 - 1.0).abs() < 1e-6);
    for (domain, truth) in true_optimum() {
        let got = num(&prediction["weights"][&domain]);
        assert!((got - truth).abs() < 1e-3, "{domain}: {got} vs {truth}");
    }
    // A second run is all cached.
    let out = run(&["--json", "run", "mix.yaml"]);
    assert!(out.status.success());
    let summary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"] == "summary")
        .expect("a summary line");
    assert_eq!(summary["summary"]["executed"], 0, "{summary}");
    assert_eq!(
        summary["summary"]["cached"], 19,
        "7 stages, 12 fanned-out runs: {summary}"
    );
}

#[test]
fn ddo_puts_a_flat_domain_on_the_bound() {
    let csv = fixture("ddo_flat.csv");
    let csv = csv.to_str().expect("utf-8 path");
    let report = autoscale_json(&["mix", "ddo", "--results", csv, "--tokens", "300M"]);
    let github = report["domains"]
        .as_array()
        .expect("domains")
        .iter()
        .find(|d| d["name"] == "github")
        .expect("github keeps its place")
        .clone();
    assert_eq!(github["flat"], true, "{github}");
    assert_eq!(github["on_bound"], true, "{github}");
    assert!(github["fit"].is_null(), "{github}");
    assert_eq!(num(&github["multiplier"]), 0.2);
    assert!((num(&report["weights"]["github"]) - 0.2 / 3.0).abs() < 1e-9);
    let warnings: Vec<&str> = report["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        warnings.iter().any(|w| w.contains(
            "domain `github`: no measurable benefit at this scale (y(0.2)=0.9957, y(1)=1.0000, y(3)=1.0640); it gets the lower bound"
        )),
        "{warnings:?}"
    );
    let sum: f64 = report["weights"]
        .as_object()
        .expect("weights")
        .values()
        .map(num)
        .sum();
    assert!((sum - 1.0).abs() < 1e-9);

    let out = autoscale(&["mix", "ddo", "--results", csv, "--flat-domains", "fail"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("domain `github`: the objective does not decrease with more data")
            && err.contains("hint:"),
        "{err}"
    );
}

#[test]
fn base_replicates_give_noise_snr_and_intervals() {
    let csv = fixture("ddo_replicates.csv");
    let csv = csv.to_str().expect("utf-8 path");
    let report = autoscale_json(&["mix", "ddo", "--results", csv, "--tokens", "300M"]);
    let noise = &report["noise"];
    assert_eq!(noise["base_runs"], 3);
    assert!((num(&noise["sigma"]) - 0.00625).abs() < 1e-12, "{noise}");
    assert_eq!(noise["base_objectives"].as_array().map(Vec::len), Some(3));
    assert_eq!(report["bootstrap"]["resamples"], 400);
    assert_eq!(num(&report["bootstrap"]["level"]), 0.9);
    for d in report["domains"].as_array().expect("domains") {
        let snr = num(&d["snr"]);
        let points = d["points"].as_array().expect("points");
        let dy = num(&points[0]["ratio"]) - num(&points[2]["ratio"]);
        assert!((snr - dy.abs() / 0.00625).abs() < 1e-6, "{d}");
        assert_eq!(d["within_noise"], false, "{d}");
        let interval = d["interval"].as_array().expect("an interval");
        let (lo, hi) = (num(&interval[0]), num(&interval[1]));
        let w = num(&d["weight"]);
        assert!(lo < hi && lo <= w + 1e-9 && w <= hi + 1e-9, "{d}");
    }

    // Two DDO reports with noise: the prediction gets intervals too.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut files = Vec::new();
    for tokens in ["300M", "900M"] {
        let report = autoscale_json(&["mix", "ddo", "--results", csv, "--tokens", tokens]);
        let path = dir.path().join(format!("ddo_{tokens}.json"));
        std::fs::write(&path, report.to_string()).expect("write");
        files.push(path.display().to_string());
    }
    let p = autoscale_json(&[
        "mix",
        "predict",
        "--at",
        &files[0],
        "--at",
        &files[1],
        "--target",
        "3B",
        "--bootstrap",
        "100",
    ]);
    assert_eq!(p["bootstrap"]["resamples"], 100, "{p}");
    for d in p["domains"].as_array().expect("domains") {
        let interval = d["interval"].as_array().expect("an interval");
        assert!(num(&interval[0]) <= num(&interval[1]), "{d}");
        assert_eq!(d["censored"], false, "{d}");
    }
    // A plain weights file has no noise: no interval, and the output says so.
    let plain = dir.path().join("plain.json");
    std::fs::write(&plain, r#"{"books": 0.3, "c4": 0.6, "github": 0.1}"#).expect("write");
    let at_plain = format!("100M={}", plain.display());
    let p = autoscale_json(&[
        "mix", "predict", "--at", &at_plain, "--at", &files[0], "--steps", "1",
    ]);
    assert!(p["bootstrap"].is_null(), "{p}");
    assert!(p["domains"][0]["interval"].is_null(), "{p}");
    assert!(
        p["warnings"]
            .as_array()
            .expect("warnings")
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("no intervals"))),
        "{p}"
    );
}
