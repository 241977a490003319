//! The data stages through the binary, on the fixture corpus: download (local sources) ->
//! prepare (one stage per domain) -> tokenizer -> shard (one stage per domain); what a change
//! reruns; and Python's view of the outputs (pyarrow, `tokenizers`, `datasets`).
//!
//! The Python checks run `tests/python/test_data.py` with the interpreter in
//! `AUTOSCALE_TEST_PYTHON`, else `.venv/bin/python` when it exists, else `python3`
//! (`tests/run.sh` installs the packages into `.venv`). They are skipped, loudly, only when
//! that interpreter or its packages are missing, and never with `AUTOSCALE_REQUIRE_DATA_PYTHON`
//! set (CI sets it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Workspace, stderr, with_outcome};
use serde_json::{Value, json};

const DOMAINS: [&str; 8] = [
    "books",
    "code",
    "forum",
    "latex",
    "manuals",
    "mixed",
    "web",
    "wikipedia",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The fixture corpus (and the mixed-text fixture) under `raw/` in the workspace.
fn raw_corpus(ws: &Workspace) {
    for d in DOMAINS {
        let from = if d == "mixed" {
            repo().join("tests/fixtures/data/mixed.jsonl")
        } else {
            repo().join(format!("tests/fixtures/corpus/{d}.jsonl"))
        };
        let to = ws.path().join(format!("raw/{d}.jsonl"));
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&from, &to).expect("copy fixture");
    }
}

/// The pipeline, with `web`'s source at `web_source`.
fn pipeline(ws: &Workspace, web_source: &str) -> PathBuf {
    let sources: Vec<String> = DOMAINS
        .iter()
        .map(|d| {
            if *d == "web" {
                format!("        - {{url: {web_source}, path: web.jsonl}}")
            } else {
                format!("        - raw/{d}.jsonl")
            }
        })
        .collect();
    let domains = DOMAINS.join(", ");
    let yaml = format!(
        r#"name: data
params:
  vocab_size: 600
  tokenizer: {{type: string, default: bpe, help: "bpe or gpt2"}}
stages:
  - id: corpus
    kind: download
    params:
      sources:
{sources}
  - id: prepare
    kind: prepare
    foreach: [{domains}]
    inputs: {{source: "corpus/${{item}}.jsonl"}}
    params: {{min_chars: 500, block_chars: 1000, val_fraction: 0.1, holdout: {{books: tail}}}}
  - id: tokenizer
    kind: tokenizer
    inputs: {{docs: prepare}}
    params: {{method: "${{params.tokenizer}}", vocab_size: "${{params.vocab_size}}", sample_docs: 50}}
  - id: shard
    kind: shard
    foreach: [{domains}]
    inputs: {{docs: "prepare[${{item}}]", tokenizer: tokenizer}}
    params: {{shard_tokens: 20000}}
"#,
        sources = sources.join("\n"),
    );
    ws.write("data.yaml", &yaml)
}

fn run(ws: &Workspace, file: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![file.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    let (code, events) = ws.run_json(&args);
    let failed: Vec<_> = events.iter().filter(|e| e["outcome"] == "failed").collect();
    assert_eq!(code, 0, "failures: {failed:?}");
    with_outcome(&events, "executed")
}

fn ids(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = DOMAINS.iter().map(|d| format!("{prefix}[{d}]")).collect();
    v.sort();
    v
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// `autoscale show`'s output directory of a stage.
fn output_dir(ws: &Workspace, file: &Path, stage: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec!["--json", "show", file.to_str().expect("utf8"), stage];
    args.extend_from_slice(extra);
    let out = ws.run(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let shown: Value = serde_json::from_slice(&out.stdout).expect("show json");
    PathBuf::from(shown["dir"].as_str().expect("dir"))
}

#[test]
fn the_data_pipeline_runs_and_reruns_only_what_a_change_touches() {
    let ws = Workspace::new();
    raw_corpus(&ws);
    let file = pipeline(&ws, "raw/web.jsonl");

    let first = run(&ws, &file, &[]);
    assert_eq!(first.len(), 1 + 8 + 1 + 8, "{first:?}");
    assert!(run(&ws, &file, &[]).is_empty(), "a rerun executes nothing");

    // Every domain's shards agree with its prepared documents.
    let shard_dir = output_dir(&ws, &file, "shard[code]", &[]);
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(shard_dir.join("manifest.json")).expect("manifest"),
    )
    .expect("json");
    let train = &manifest["domains"]["code"]["train"];
    assert!(train["tokens"].as_u64() > Some(20_000), "{train}");
    assert!(train["shards"].as_array().expect("shards").len() >= 2);
    assert_eq!(manifest["vocab_size"], 600);
    let books = output_dir(&ws, &file, "prepare[books]", &[]);
    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(books.join("stats.json")).expect("stats"))
            .expect("json");
    assert_eq!(stats["holdout"], "tail");
    assert_eq!(stats["val"]["docs"], stats["kept"], "one tail per book");

    // A new vocab size: the tokenizer and the shards, not the download or `prepare`.
    let rerun = run(&ws, &file, &["--set", "vocab_size=700"]);
    let mut expected = ids("shard");
    expected.push("tokenizer".into());
    assert_eq!(sorted(rerun), sorted(expected));

    python_checks(&ws, &file);

    // GPT-2's tokenizer does not depend on the corpus, so one domain's new source reruns only
    // that domain's stages.
    let gpt2 = ["--set", "tokenizer=gpt2"];
    let rerun = run(&ws, &file, &gpt2);
    assert_eq!(rerun.len(), 1 + 8, "{rerun:?}");
    let web = std::fs::read_to_string(ws.path().join("raw/web.jsonl")).expect("web");
    let fewer: String = web.lines().skip(3).map(|l| format!("{l}\n")).collect();
    ws.write("raw/web-v2.jsonl", &fewer);
    let changed = pipeline(&ws, "raw/web-v2.jsonl");
    let rerun = run(&ws, &changed, &gpt2);
    // The download reruns (its source list changed) and writes the other domains' files
    // unchanged; the tokenizer reruns because its declared input changed, but GPT-2's is the
    // same bytes, so only web's shards follow (early cutoff).
    assert_eq!(
        sorted(rerun),
        ["corpus", "prepare[web]", "shard[web]", "tokenizer"]
    );
    // A trained tokenizer samples every domain, so the same change retrains it and, with new
    // ids, reshards every domain: correct, and the reason per-domain caching needs a fixed
    // tokenizer.
    let rerun = run(&ws, &changed, &["--set", "vocab_size=700"]);
    assert!(rerun.contains(&"tokenizer".to_string()), "{rerun:?}");
    assert!(
        !rerun.iter().any(|s| s.starts_with("prepare[")),
        "{rerun:?}"
    );
}

/// The interpreter for the Python checks, if it has what they need.
fn python() -> Option<String> {
    let py = std::env::var("AUTOSCALE_TEST_PYTHON")
        .ok()
        .unwrap_or_else(|| {
            let venv = repo().join(".venv/bin/python");
            if venv.exists() {
                venv.to_string_lossy().into_owned()
            } else {
                "python3".into()
            }
        });
    let ok = Command::new(&py)
        .args(["-c", "import pyarrow, tokenizers, pytest"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        Some(py)
    } else if std::env::var_os("AUTOSCALE_REQUIRE_DATA_PYTHON").is_some() {
        panic!(
            "AUTOSCALE_REQUIRE_DATA_PYTHON is set, but `{py}` lacks pyarrow/tokenizers/pytest \
             (tests/run.sh installs them into .venv)"
        );
    } else {
        eprintln!(
            "SKIPPED: the Python checks of the data stages (pyarrow, tokenizers, datasets): `{py}` \
             is missing or lacks pyarrow/tokenizers/pytest. Run `bash tests/run.sh`, which installs \
             them into .venv, or set AUTOSCALE_TEST_PYTHON."
        );
        None
    }
}

fn python_checks(ws: &Workspace, file: &Path) {
    let Some(py) = python() else {
        return;
    };
    let set = ["--set", "vocab_size=700"];
    let tokenizer = output_dir(ws, file, "tokenizer", &set).join("tokenizer.json");
    let runs: Vec<Value> = DOMAINS
        .iter()
        .map(|d| {
            json!({
                "shards": output_dir(ws, file, &format!("shard[{d}]"), &set),
                "tokenizer": tokenizer,
                "prepared": {*d: output_dir(ws, file, &format!("prepare[{d}]"), &set)},
            })
        })
        .collect();
    // GPT-2's tokenizer, from its own one-stage pipeline.
    let gpt2_file = ws.write(
        "gpt2.yaml",
        "name: gpt2\nstages:\n  - {id: tok, kind: tokenizer, params: {method: gpt2}}\n",
    );
    run(ws, &gpt2_file, &[]);
    let gpt2 = output_dir(ws, &gpt2_file, "tok", &[]).join("tokenizer.json");
    let spec = ws.write(
        "python-spec.json",
        &json!({"runs": runs, "gpt2_tokenizer": gpt2}).to_string(),
    );
    let out = Command::new(&py)
        .args(["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"])
        .arg(repo().join("tests/python/test_data.py"))
        .env("AUTOSCALE_TEST_DATA", &spec)
        .current_dir(repo())
        .output()
        .expect("run pytest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the Python checks failed:\n{text}");
    // Where the suite must run (CI), the `datasets` check runs too: no skip is a pass.
    let required = std::env::var_os("AUTOSCALE_REQUIRE_DATA_PYTHON").is_some();
    assert!(
        text.contains("4 passed") && !text.contains("skipped")
            || !required && text.contains("3 passed, 1 skipped"),
        "{text}"
    );
    eprintln!(
        "Python checks of the data stages: {}",
        text.lines().last().unwrap_or_default()
    );
    for line in text.lines().filter(|l| l.starts_with("SKIPPED")) {
        eprintln!("{line}");
    }
}
