//! The no-op fast path: after a run that ended all cached or executed, `run` and `status`
//! answer from a stamp when nothing it records has moved, and take the full path on any doubt.
//! Files written less than 2 s before a run are racy (git's rule), so each test lets its files
//! age before it expects the stamp to answer.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Workspace, events, stderr, with_outcome};
use serde_json::Value;

const PIPELINE: &str = r#"
name: stamped
env: [STAMP_TEST_MODE]
stages:
  - id: read
    kind: command
    params: {n: 1}
    inputs: {src: "file:data"}
    cmd: "cat $AUTOSCALE_INPUT_SRC/x.txt > $AUTOSCALE_OUT/read.txt; echo $STAMP_TEST_MODE >> $AUTOSCALE_OUT/read.txt"
  - id: fan
    kind: command
    foreach: [a, b]
    params: {item: "${item}"}
    inputs: {r: read}
    cmd: "cat $AUTOSCALE_INPUT_R/read.txt > $AUTOSCALE_OUT/f.txt"
"#;

/// Lets every file of the workspace fall out of the racy window.
fn age() {
    std::thread::sleep(Duration::from_millis(2100));
}

fn setup() -> Workspace {
    let ws = Workspace::new();
    ws.write("p.yaml", PIPELINE);
    ws.write("data/x.txt", "one\n");
    age();
    ws
}

struct Run {
    code: i32,
    events: Vec<Value>,
    from_stamp: bool,
}

fn run_with(ws: &Workspace, args: &[&str], mode: &str) -> Run {
    let mut all = vec!["--json", "run", "p.yaml"];
    all.extend_from_slice(args);
    let out = ws
        .cmd(&all)
        .env("STAMP_TEST_MODE", mode)
        .output()
        .expect("run autoscale");
    let evs = events(&out);
    let summary = evs
        .iter()
        .find(|e| e["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary: {}", stderr(&out)));
    Run {
        code: out.status.code().unwrap_or(-1),
        from_stamp: summary["summary"]["from_stamp"] == true,
        events: evs.clone(),
    }
}

fn run(ws: &Workspace, args: &[&str]) -> Run {
    run_with(ws, args, "a")
}

/// Runs until a no-op is answered from the stamp (the first run after a change takes the full
/// path and writes it).
fn settle(ws: &Workspace, args: &[&str]) -> Run {
    let first = run(ws, args);
    assert_eq!(first.code, 0, "{:?}", first.events);
    let second = run(ws, args);
    assert!(second.from_stamp, "{:?}", second.events);
    second
}

#[test]
fn a_no_op_answers_from_the_stamp_and_still_reports_every_stage_cached() {
    let ws = setup();
    let first = run(&ws, &[]);
    assert_eq!(first.code, 0);
    assert!(!first.from_stamp);
    assert_eq!(with_outcome(&first.events, "executed").len(), 3);
    let noop = run(&ws, &[]);
    assert!(noop.from_stamp, "{:?}", noop.events);
    assert_eq!(noop.code, 0);
    assert_eq!(
        with_outcome(&noop.events, "cached"),
        ["fan[a]", "fan[b]", "read"]
    );
    // The keys are the ones the full path computed.
    let key_of = |evs: &[Value], stage: &str| {
        evs.iter()
            .find(|e| e["event"] == "finished" && e["stage"] == stage)
            .map(|e| e["key"].clone())
    };
    for stage in ["read", "fan[a]", "fan[b]"] {
        assert_eq!(key_of(&first.events, stage), key_of(&noop.events, stage));
    }
    // `status` answers from it too (it says so at -v), listing every stage as cached.
    let out = ws
        .cmd(&["-v", "--json", "status", "p.yaml"])
        .env("STAMP_TEST_MODE", "a")
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("answered from the stamp"),
        "{}",
        stderr(&out)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["state"] == "cached"), "{lines:?}");
}

#[test]
fn editing_the_pipeline_or_setting_a_param_is_not_a_no_op() {
    let ws = setup();
    settle(&ws, &[]);
    // --set is a different question: the full path answers it.
    let set = run(&ws, &["--set", "read.n=2"]);
    assert!(!set.from_stamp);
    assert_eq!(with_outcome(&set.events, "executed"), ["read"]);
    // The pipeline file edited (a param changed).
    ws.write(
        "p.yaml",
        &PIPELINE.replace("params: {n: 1}", "params: {n: 3}"),
    );
    let edited = run(&ws, &[]);
    assert!(!edited.from_stamp);
    assert_eq!(with_outcome(&edited.events, "executed"), ["read"]);
}

#[test]
fn a_declared_env_change_is_not_a_no_op() {
    let ws = setup();
    settle(&ws, &[]);
    let changed = run_with(&ws, &[], "b");
    assert!(!changed.from_stamp);
    // `read` writes the variable, so its dependents rerun too.
    assert_eq!(
        with_outcome(&changed.events, "executed"),
        ["fan[a]", "fan[b]", "read"]
    );
}

#[test]
fn an_input_edited_with_its_mtime_restored_is_not_a_no_op() {
    let ws = setup();
    settle(&ws, &[]);
    let file = ws.path().join("data/x.txt");
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    std::fs::write(&file, "two\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), mtime);
    let edited = run(&ws, &[]);
    assert!(!edited.from_stamp, "{:?}", edited.events);
    assert_eq!(
        with_outcome(&edited.events, "executed"),
        ["fan[a]", "fan[b]", "read"]
    );
}

#[test]
fn a_new_binary_or_a_missing_result_is_not_a_no_op() {
    let ws = setup();
    settle(&ws, &[]);
    // Another build of autoscale (here: a copy, another inode and mtime).
    let copy: PathBuf = ws.path().join("bin/autoscale");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_autoscale"), &copy).unwrap();
    let out = std::process::Command::new(&copy)
        .args(["--json", "run", "p.yaml"])
        .current_dir(ws.path())
        .env("AUTOSCALE_CACHE_DIR", ws.cache())
        .env("STAMP_TEST_MODE", "a")
        .output()
        .unwrap();
    let evs = events(&out);
    let summary = evs.iter().find(|e| e["event"] == "summary").unwrap();
    assert!(summary["summary"].get("from_stamp").is_none(), "{summary}");
    assert_eq!(with_outcome(&evs, "cached").len(), 3);
    // A result removed from the cache: the full path finds the miss and reruns it.
    settle(&ws, &[]);
    let show = ws
        .cmd(&["--json", "show", "p.yaml", "fan[a]"])
        .env("STAMP_TEST_MODE", "a")
        .output()
        .unwrap();
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    let key = shown["key"].as_str().unwrap().to_string();
    let manifest = ws
        .cache()
        .join("v1/actions")
        .join(&key[..2])
        .join(format!("{key}.json"));
    std::fs::remove_file(&manifest).unwrap();
    let missing = run(&ws, &[]);
    assert!(!missing.from_stamp);
    assert_eq!(with_outcome(&missing.events, "executed"), ["fan[a]"]);
}

/// The demo's layout: the pipeline in `pipelines/`, `root: ..`, file inputs relative to the
/// root, a folder input with several files and a subfolder. The stamp must stat the same files
/// the run hashed.
#[test]
fn a_pipeline_with_a_root_elsewhere_gets_a_stamp() {
    let ws = Workspace::new();
    ws.write(
        "pipelines/p.yaml",
        &PIPELINE.replace("name: stamped\n", "name: stamped\nroot: ..\n"),
    );
    ws.write("data/x.txt", "one\n");
    ws.write("data/y.txt", "y\n");
    ws.write("data/sub/z.txt", "z\n");
    age();
    let mut all = vec!["--json", "run", "pipelines/p.yaml"];
    let first = ws.cmd(&all).env("STAMP_TEST_MODE", "a").output().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    all.insert(0, "-v");
    let second = ws.cmd(&all).env("STAMP_TEST_MODE", "a").output().unwrap();
    let evs = events(&second);
    let summary = evs.iter().find(|e| e["event"] == "summary").unwrap();
    assert_eq!(summary["summary"]["from_stamp"], true, "{summary}");
    assert_eq!(with_outcome(&evs, "cached").len(), 3);
}
