//! The engine end to end through the CLI: caching, reruns and their reasons, early cutoff,
//! crashes, concurrent processes, GPU pinning, failures and run-time fan-out.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Workspace, stderr, stdout, with_outcome};

const CHAIN: &str = r#"
name: chain
params:
  lr: {type: float, default: 3.0e-4}
  note: hello
stages:
  - id: prepare
    kind: command
    params: {note: "${params.note}"}
    cmd: "echo prepared > $AUTOSCALE_OUT/data.txt"
    outputs: [data.txt]
  - id: train
    kind: command
    params: {lr: "${params.lr}"}
    inputs: {data: prepare/data.txt}
    cmd: "cat $AUTOSCALE_INPUT_DATA > $AUTOSCALE_OUT/model.txt; echo lr=$AUTOSCALE_PARAM_LR >> $AUTOSCALE_OUT/model.txt"
    outputs: [model.txt]
  - id: eval
    kind: command
    inputs: {model: train}
    cmd: "wc -l < $AUTOSCALE_INPUT_MODEL/model.txt > $AUTOSCALE_OUT/eval.txt"
  - id: other
    kind: command
    inputs: {data: prepare}
    cmd: "echo other > $AUTOSCALE_OUT/o.txt"
"#;

#[test]
fn first_run_executes_everything_and_a_second_run_nothing() {
    let ws = Workspace::new();
    ws.write("p.yaml", CHAIN);
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0);
    assert_eq!(
        with_outcome(&events, "executed"),
        ["eval", "other", "prepare", "train"]
    );
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0);
    assert!(with_outcome(&events, "executed").is_empty());
    assert_eq!(with_outcome(&events, "cached").len(), 4);
    let summary = events
        .iter()
        .find(|e| e["event"] == "summary")
        .expect("summary event");
    assert_eq!(summary["summary"]["executed"], 0);
}

#[test]
fn set_reruns_exactly_the_stage_and_its_dependents_and_status_says_why() {
    let ws = Workspace::new();
    ws.write("p.yaml", CHAIN);
    assert_eq!(ws.run_json(&["p.yaml"]).0, 0);
    let status = ws.run(&["status", "p.yaml", "--set", "lr=6e-4"]);
    let text = stdout(&status);
    assert!(text.contains("param lr changed 0.0003 -> 0.0006"), "{text}");
    assert!(
        text.contains("waits on `train`"),
        "eval's key is unknown until train has run: {text}"
    );
    let (code, events) = ws.run_json(&["p.yaml", "--set", "lr=6e-4"]);
    assert_eq!(code, 0);
    assert_eq!(with_outcome(&events, "executed"), ["eval", "train"]);
    assert_eq!(with_outcome(&events, "cached"), ["other", "prepare"]);
    // A stage param set directly works the same way.
    let (_, events) = ws.run_json(&["p.yaml", "--set", "train.lr=1e-3"]);
    assert_eq!(with_outcome(&events, "executed"), ["eval", "train"]);
}

#[test]
fn an_upstream_rerun_with_identical_bytes_leaves_dependents_cached() {
    let ws = Workspace::new();
    ws.write("p.yaml", CHAIN);
    assert_eq!(ws.run_json(&["p.yaml"]).0, 0);
    // `note` changes prepare's key but not the bytes it writes.
    let (code, events) = ws.run_json(&["p.yaml", "--set", "note=changed"]);
    assert_eq!(code, 0);
    assert_eq!(with_outcome(&events, "executed"), ["prepare"]);
    assert_eq!(with_outcome(&events, "cached"), ["eval", "other", "train"]);
}

#[test]
fn explain_and_show_report_the_record_and_outputs() {
    let ws = Workspace::new();
    ws.write("p.yaml", CHAIN);
    assert_eq!(ws.run_json(&["p.yaml"]).0, 0);
    let out = ws.run(&["explain", "p.yaml", "train", "--set", "lr=1e-3"]);
    let text = stdout(&out);
    assert!(text.contains("\"lr\": 0.001"), "{text}");
    assert!(text.contains("param lr changed 0.0003 -> 0.001"), "{text}");
    let out = ws.run(&["--json", "show", "p.yaml", "train"]);
    let shown: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    let model = shown["files"][0]["abs_path"].as_str().expect("path");
    assert_eq!(
        std::fs::read_to_string(model).expect("read output"),
        "prepared\nlr=0.0003\n"
    );
    let out = ws.run(&["show", "p.yaml", "train", "--set", "lr=5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no cached result"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_stage_killed_mid_run_leaves_no_cache_entry_and_the_next_run_completes() {
    let ws = Workspace::new();
    let marker = ws.path().join("slow");
    let (began, ended) = (ws.path().join("began"), ws.path().join("ended"));
    std::fs::write(&marker, "").expect("marker");
    ws.write(
        "p.yaml",
        &format!(
            r#"
name: crash
stages:
  - id: quick
    kind: command
    cmd: "echo quick > $AUTOSCALE_OUT/q.txt"
  - id: slow
    kind: command
    inputs: {{q: quick}}
    cmd: "echo partial > $AUTOSCALE_OUT/half.txt; touch {began}; if [ -f {marker} ]; then sleep 60; fi; echo done > $AUTOSCALE_OUT/full.txt; touch {ended}"
"#,
            marker = marker.display(),
            began = began.display(),
            ended = ended.display(),
        ),
    );
    let mut child = ws
        .cmd(&["--json", "run", "p.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut started = false;
    for line in lines.by_ref() {
        let line = line.expect("utf8");
        if line.contains("\"started\"") && line.contains("\"slow\"") {
            started = true;
            break;
        }
    }
    assert!(started, "the run reported `slow` started");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !began.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The kill lands mid-run: the stage has begun and not ended, and the engine still runs.
    assert!(began.exists(), "the stage's command began");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the engine is still running"
    );
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert!(!ended.exists(), "the kill came before the stage ended");
    let ls = stdout_of(&ws, &["--json", "cache", "ls"]);
    // `quick` may or may not be committed when the kill comes; `slow` must not be.
    assert!(
        !ls.contains("\"slow\""),
        "no entry for the killed stage: {ls}"
    );
    std::fs::remove_file(&marker).expect("rm marker");
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0);
    let executed = with_outcome(&events, "executed");
    assert!(
        executed == ["slow"] || executed == ["quick", "slow"],
        "{executed:?}"
    );
    let verify = ws.run(&["cache", "verify"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        stdout_of(&ws, &["cache", "verify"])
    );
    let show = stdout_of(&ws, &["--json", "show", "p.yaml", "slow"]);
    assert!(
        show.contains("full.txt") && show.contains("half.txt"),
        "{show}"
    );
}

/// The folder of a cached stage's outputs, from `show --json`.
fn output_dir(ws: &Workspace, pipeline: &str, stage: &str) -> std::path::PathBuf {
    let show: serde_json::Value =
        serde_json::from_str(&stdout_of(ws, &["--json", "show", pipeline, stage])).expect("json");
    std::path::PathBuf::from(show["dir"].as_str().expect("dir"))
}

fn stdout_of(ws: &Workspace, args: &[&str]) -> String {
    stdout(&ws.run(args))
}

#[test]
fn two_processes_on_one_cache_both_finish_and_run_each_stage_once() {
    let ws = Workspace::new();
    let counter = ws.path().join("executions.log");
    let mut yaml = String::from("name: together\nstages:\n");
    for i in 0..6 {
        yaml.push_str(&format!(
            "  - id: s{i}\n    kind: command\n    cmd: \"echo s{i} >> {c}; sleep 0.3; echo {i} > $AUTOSCALE_OUT/o.txt\"\n",
            c = counter.display()
        ));
    }
    yaml.push_str(
        "  - id: join\n    kind: command\n    inputs: {a: s0, b: s5}\n    cmd: \"echo join >> ",
    );
    yaml.push_str(&format!(
        "{}; echo j > $AUTOSCALE_OUT/j.txt\"\n",
        counter.display()
    ));
    ws.write("p.yaml", &yaml);
    let a = ws
        .cmd(&["--json", "run", "p.yaml", "--jobs", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("a");
    let b = ws
        .cmd(&["--json", "run", "p.yaml", "--jobs", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("b");
    let (a, b) = (
        a.wait_with_output().expect("a"),
        b.wait_with_output().expect("b"),
    );
    assert_eq!(a.status.code(), Some(0), "{}", stderr(&a));
    assert_eq!(b.status.code(), Some(0), "{}", stderr(&b));
    let log = std::fs::read_to_string(&counter).expect("log");
    let mut runs: Vec<&str> = log.lines().collect();
    runs.sort();
    assert_eq!(
        runs,
        ["join", "s0", "s1", "s2", "s3", "s4", "s5"],
        "each stage ran exactly once"
    );
    let executed = with_outcome(&common::events(&a), "executed").len()
        + with_outcome(&common::events(&b), "executed").len();
    assert_eq!(executed, 7);
    assert_eq!(ws.run(&["cache", "verify"]).status.code(), Some(0));
}

#[test]
fn gpu_stages_get_their_own_devices_four_at_a_time() {
    let ws = Workspace::new();
    let trace = ws.path().join("trace");
    std::fs::create_dir_all(&trace).expect("trace dir");
    ws.write("p.yaml", &common::gpu_trace_pipeline(&trace, 8, 0.6));
    let (code, events) = ws.run_json(&["p.yaml", "--gpus", "0,1,2,3", "--jobs", "8"]);
    assert_eq!(code, 0);
    assert_eq!(with_outcome(&events, "executed").len(), 8);
    // (start, end, device) per stage, from what the stages saw; never two at once on one.
    let spans = common::gpu_spans(&trace, 8);
    for (_, _, device) in &spans {
        assert!(
            ["0", "1", "2", "3"].contains(&device.as_str()),
            "one device each, got `{device}`"
        );
    }
    // The most stages running at one instant: count at every start.
    let max_overlap = spans
        .iter()
        .map(|a| spans.iter().filter(|b| b.0 <= a.0 && a.0 < b.1).count())
        .max()
        .unwrap_or(0);
    assert_eq!(max_overlap, 4, "four devices, four at a time");
    let started: Vec<_> = events.iter().filter(|e| e["event"] == "started").collect();
    assert!(
        started
            .iter()
            .all(|e| e["devices"].as_array().is_some_and(|d| d.len() == 1))
    );
}

#[test]
fn a_gpu_stage_without_a_gpu_runs_on_the_cpu_unless_it_requires_one() {
    let ws = Workspace::new();
    ws.write(
        "p.yaml",
        "name: cpu\nstages:\n  - id: t\n    kind: command\n    resources: {gpus: 1}\n    cmd: \"echo [$CUDA_VISIBLE_DEVICES] > $AUTOSCALE_OUT/d\"\n",
    );
    let out = ws.run(&["run", "p.yaml", "--gpus", "none"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("no GPU available"),
        "{}",
        stderr(&out)
    );
    ws.write(
        "q.yaml",
        "name: req\nstages:\n  - id: t\n    kind: command\n    resources: {gpus: 1, require_gpu: true}\n    cmd: \"true\"\n",
    );
    let out = ws.run(&["run", "q.yaml", "--gpus", "none"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("requires 1 GPU(s) and none is available"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn failures_are_not_cached_dependents_skip_and_keep_going_runs_the_rest() {
    let ws = Workspace::new();
    ws.write(
        "p.yaml",
        r#"
name: fails
stages:
  - id: bad
    kind: command
    cmd: "echo about to fail; exit 3"
  - id: after
    kind: command
    inputs: {b: bad}
    cmd: "true"
  - id: fine
    kind: command
    cmd: "echo ok > $AUTOSCALE_OUT/ok"
"#,
    );
    let (code, events) = ws.run_json(&["p.yaml", "--keep-going", "--jobs", "1"]);
    assert_eq!(code, 1);
    assert_eq!(with_outcome(&events, "failed"), ["bad"]);
    assert_eq!(with_outcome(&events, "skipped"), ["after"]);
    assert_eq!(with_outcome(&events, "executed"), ["fine"]);
    let failed = events
        .iter()
        .find(|e| e["outcome"] == "failed")
        .expect("failed event");
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or_default()
            .contains("about to fail"),
        "the log tail is in the error"
    );
    // `status` says the stage failed last time, and where its log is.
    let out = ws.run(&["status", "p.yaml"]);
    let text = common::stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.contains("bad") && l.contains("failed last run (log: ")),
        "{text}"
    );
    let (code, events) = ws.run_json(&["p.yaml", "--keep-going"]);
    assert_eq!(code, 1);
    assert_eq!(
        with_outcome(&events, "failed"),
        ["bad"],
        "a failure is never cached"
    );
}

#[test]
fn retries_rerun_a_flaky_stage() {
    let ws = Workspace::new();
    let marker = ws.path().join("attempted");
    ws.write(
        "p.yaml",
        &format!(
            "name: flaky\nstages:\n  - id: f\n    kind: command\n    retries: 1\n    cmd: \"if [ -f {m} ]; then echo ok > $AUTOSCALE_OUT/r; else touch {m}; exit 1; fi\"\n",
            m = marker.display()
        ),
    );
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0);
    assert_eq!(with_outcome(&events, "executed"), ["f"]);
    assert_eq!(events.iter().filter(|e| e["event"] == "started").count(), 2);
}

#[test]
fn a_missing_declared_output_fails_the_stage() {
    let ws = Workspace::new();
    ws.write("p.yaml", "name: o\nstages:\n  - id: s\n    kind: command\n    cmd: \"true\"\n    outputs: [model.bin]\n");
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 1);
    let failed = events
        .iter()
        .find(|e| e["outcome"] == "failed")
        .expect("failed");
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or_default()
            .contains("`model.bin`"),
        "{failed}"
    );
    // The hint is a field of its own in JSON, not folded into the message.
    assert!(
        failed["hint"]
            .as_str()
            .is_some_and(|h| h.contains("$AUTOSCALE_OUT")),
        "{failed}"
    );
    assert!(
        !failed["error"]
            .as_str()
            .unwrap_or_default()
            .contains("hint:"),
        "{failed}"
    );
}

fn fanout_yaml(plans: &[(&str, &[&str])]) -> String {
    let mut yaml = String::from("name: fan\nstages:\n");
    for (plan, children) in plans {
        let list: Vec<String> = children
            .iter()
            .map(|c| {
                format!("{{\\\"id\\\": \\\"{c}\\\", \\\"params\\\": {{\\\"run\\\": \\\"{c}\\\"}}}}")
            })
            .collect();
        yaml.push_str(&format!(
            "  - id: {plan}\n    kind: command\n    cmd: \"echo '{{\\\"children\\\": [{}]}}' > $AUTOSCALE_OUT/fanout.json\"\n  - id: proxy_{plan}\n    kind: command\n    fanout: {plan}\n    cmd: \"echo trained $AUTOSCALE_PARAM_RUN > $AUTOSCALE_OUT/eval.txt\"\n  - id: fit_{plan}\n    kind: command\n    inputs: {{runs: proxy_{plan}}}\n    cmd: \"cat $AUTOSCALE_INPUT_RUNS/*/eval.txt > $AUTOSCALE_OUT/fit.txt\"\n",
            list.join(", ")
        ));
    }
    yaml
}

#[test]
fn runtime_fanout_shares_a_base_run_and_adding_a_child_runs_only_it() {
    let ws = Workspace::new();
    ws.write(
        "p.yaml",
        &fanout_yaml(&[("small", &["base", "a-x0.2"]), ("other", &["base", "b-x3"])]),
    );
    let status = stdout(&ws.run(&["status", "p.yaml"]));
    assert!(
        status.contains("proxy_small") && status.contains("waits on `small`"),
        "a placeholder before: {status}"
    );
    let (code, events) = ws.run_json(&["p.yaml", "--jobs", "1"]);
    assert_eq!(code, 0);
    let executed = with_outcome(&events, "executed");
    let cached = with_outcome(&events, "cached");
    let base_runs = executed.iter().filter(|s| s.ends_with("[base]")).count();
    assert_eq!(
        base_runs, 1,
        "the shared base run trains once: {executed:?} / {cached:?}"
    );
    assert_eq!(cached.iter().filter(|s| s.ends_with("[base]")).count(), 1);
    let status = stdout(&ws.run(&["status", "p.yaml"]));
    assert!(
        status.contains("proxy_small[a-x0.2]"),
        "children show once known: {status}"
    );
    ws.write(
        "p.yaml",
        &fanout_yaml(&[
            ("small", &["base", "a-x0.2", "a-x3"]),
            ("other", &["base", "b-x3"]),
        ]),
    );
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0);
    assert_eq!(
        with_outcome(&events, "executed"),
        ["fit_small", "proxy_small[a-x3]", "small"]
    );
}

#[test]
fn dag_prints_dot_and_mermaid() {
    let ws = Workspace::new();
    ws.write("p.yaml", CHAIN);
    let dot = stdout(&ws.run(&["dag", "p.yaml"]));
    assert!(
        dot.starts_with("digraph") && dot.contains("\"prepare\" -> \"train\""),
        "{dot}"
    );
    let mermaid = stdout(&ws.run(&["dag", "p.yaml", "--format", "mermaid"]));
    assert!(
        mermaid.starts_with("flowchart LR") && mermaid.contains("s0 --> s1"),
        "{mermaid}"
    );
}

#[test]
fn cache_gc_keeps_what_a_pipeline_references() {
    let ws = Workspace::new();
    ws.write("p.yaml", CHAIN);
    assert_eq!(ws.run_json(&["p.yaml"]).0, 0);
    assert_eq!(ws.run_json(&["p.yaml", "--set", "lr=1"]).0, 0);
    let before: BTreeMap<String, usize> = [(
        "entries".to_string(),
        stdout_of(&ws, &["--json", "cache", "ls"]).lines().count(),
    )]
    .into();
    assert_eq!(before["entries"], 6);
    let gc = ws.run(&["cache", "gc", "p.yaml"]);
    assert_eq!(gc.status.code(), Some(0));
    assert!(stdout(&gc).contains("removed 2 results"), "{}", stdout(&gc));
    let (_, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(with_outcome(&events, "cached").len(), 4);
    assert_eq!(ws.run(&["cache", "verify"]).status.code(), Some(0));
}

#[test]
fn ctrl_c_stops_the_children_caches_nothing_half_done_and_the_next_run_resumes() {
    let ws = Workspace::new();
    let marker = ws.path().join("slow");
    let pidfile = ws.path().join("child.pid");
    std::fs::write(&marker, "").expect("marker");
    ws.write(
        "p.yaml",
        &format!(
            "name: int\nstages:\n  - id: slow\n    kind: command\n    cmd: \"echo $$ > {p}; if [ -f {m} ]; then sleep 60; fi; echo ok > $AUTOSCALE_OUT/r\"\n",
            p = pidfile.display(),
            m = marker.display()
        ),
    );
    let child = ws
        .cmd(&["run", "p.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pidfile.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stage_pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("the stage started")
        .trim()
        .parse()
        .expect("pid");
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("0 failed") && stderr(&out).contains("1 stopped"),
        "an interrupted stage did not fail: {}",
        stderr(&out)
    );
    let status = common::stdout(&ws.run(&["status", "p.yaml"]));
    assert!(!status.contains("failed last run"), "{status}");
    // The stage's shell is gone (its process group got SIGTERM).
    let alive = std::path::Path::new(&format!("/proc/{stage_pid}")).exists();
    assert!(!alive, "the stage's process was stopped");
    std::fs::remove_file(&marker).expect("rm marker");
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0);
    assert_eq!(with_outcome(&events, "executed"), ["slow"]);
}

/// The issue's repro: a run killed while its stage still writes, then an immediate rerun. The
/// killed stage's process must not live on and append to the rerun's result.
#[test]
fn a_killed_runs_stage_does_not_write_into_the_next_runs_result() {
    let ws = Workspace::new();
    let started = ws.path().join("started");
    ws.write(
        "p.yaml",
        &format!(
            r#"
name: orphan
stages:
  - id: slow
    kind: command
    cmd: "echo part1 > $AUTOSCALE_OUT/v.txt; touch {started}; (sleep 2; echo bg >> $AUTOSCALE_OUT/bg.txt) & sleep 2; echo part2 >> $AUTOSCALE_OUT/v.txt; wait"
"#,
            started = started.display()
        ),
    );
    let mut child = ws
        .cmd(&["run", "p.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(started.exists(), "the stage started");
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    std::fs::remove_file(&started).expect("rm");
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0);
    assert_eq!(with_outcome(&events, "executed"), ["slow"]);
    // Past the moment the killed attempt's processes would have written.
    std::thread::sleep(Duration::from_millis(2500));
    let dir = output_dir(&ws, "p.yaml", "slow");
    assert_eq!(
        std::fs::read_to_string(dir.join("v.txt")).expect("v.txt"),
        "part1\npart2\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("bg.txt")).expect("bg.txt"),
        "bg\n"
    );
    let verify = ws.run(&["cache", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", stdout(&verify));
}

/// The issue's repro: a background job keeps writing to an output after the command exits 0.
/// It is killed before the outputs are hashed, so the stored blob never changes under its
/// digest and a dependent reads what the command wrote.
#[test]
fn a_background_job_cannot_write_after_the_command_exits() {
    let ws = Workspace::new();
    ws.write(
        "p.yaml",
        r#"
name: late
stages:
  - id: writer
    kind: command
    cmd: "exec 3>$AUTOSCALE_OUT/v.txt; echo good >&3; (sleep 1; echo LATE >&3) &"
  - id: reader
    kind: command
    inputs: {v: writer/v.txt}
    cmd: "sleep 1.5; cat $AUTOSCALE_INPUT_V > $AUTOSCALE_OUT/copy.txt"
"#,
    );
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0);
    assert_eq!(with_outcome(&events, "executed"), ["reader", "writer"]);
    std::thread::sleep(Duration::from_millis(1500));
    let dir = output_dir(&ws, "p.yaml", "reader");
    assert_eq!(
        std::fs::read_to_string(dir.join("copy.txt")).expect("copy"),
        "good\n"
    );
    let verify = ws.run(&["cache", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", stdout(&verify));
}

/// An input file edited while its stage runs: the result is not cached under the old content's
/// key; the stage fails with the input named, and the next run computes it from the new content.
#[test]
fn an_input_edited_while_its_stage_runs_is_not_cached_under_the_old_key() {
    let ws = Workspace::new();
    let data = ws.path().join("data.txt");
    std::fs::write(&data, "old\n").expect("data");
    ws.write(
        "p.yaml",
        &format!(
            r#"
name: edit
stages:
  - id: use
    kind: command
    inputs: {{d: "file:data.txt"}}
    cmd: "cat $AUTOSCALE_INPUT_D > $AUTOSCALE_OUT/first.txt; echo new > {data}; cat $AUTOSCALE_INPUT_D > $AUTOSCALE_OUT/second.txt"
"#,
            data = data.display()
        ),
    );
    let out = ws.run(&["run", "p.yaml"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("changed while the stage ran"),
        "{}",
        stderr(&out)
    );
    let ls = stdout_of(&ws, &["--json", "cache", "ls"]);
    assert!(!ls.contains("\"use\""), "nothing cached: {ls}");
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0);
    assert_eq!(with_outcome(&events, "executed"), ["use"]);
}

/// The issue's repro: an output hardlinked to a file outside the cache. The outside file is
/// neither made read-only nor taken in as the blob, so editing it later leaves the result alone.
#[test]
fn a_hardlinked_output_is_copied_not_adopted() {
    use std::os::unix::fs::PermissionsExt;
    let ws = Workspace::new();
    let outside = ws.path().join("outside.txt");
    std::fs::write(&outside, "original\n").expect("outside");
    ws.write(
        "p.yaml",
        &format!(
            "name: link\nstages:\n  - id: l\n    kind: command\n    cmd: \"ln {o} $AUTOSCALE_OUT/h\"\n",
            o = outside.display()
        ),
    );
    let (code, _) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0);
    let mode = std::fs::metadata(&outside)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o200,
        0o200,
        "the outside file stays writable: {mode:o}"
    );
    std::fs::write(&outside, "edited!!\n").expect("edit");
    let dir = output_dir(&ws, "p.yaml", "l");
    assert_eq!(
        std::fs::read_to_string(dir.join("h")).expect("h"),
        "original\n"
    );
    let verify = ws.run(&["cache", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", stdout(&verify));
}

/// The issue's repros of tampered cache content: a file replaced in a result's output folder,
/// and a result whose blobs and folder are both gone. Neither is served: the entry is set aside,
/// `status` says why, the stage reruns and its dependent reads the right bytes.
#[test]
fn a_tampered_or_vanished_result_is_recomputed_not_served() {
    let ws = Workspace::new();
    ws.write(
        "p.yaml",
        r#"
name: tamper
stages:
  - id: make
    kind: command
    cmd: "echo good > $AUTOSCALE_OUT/v.txt"
  - id: use
    kind: command
    inputs: {v: make/v.txt}
    cmd: "cat $AUTOSCALE_INPUT_V > $AUTOSCALE_OUT/copy.txt"
"#,
    );
    assert_eq!(ws.run_json(&["p.yaml"]).0, 0);
    // A second run writes the no-op stamp: the tampering must get past it too.
    assert_eq!(ws.run_json(&["p.yaml"]).0, 0);
    let dir = output_dir(&ws, "p.yaml", "make");
    let file = dir.join("v.txt");
    std::fs::remove_file(&file).expect("rm");
    std::fs::write(&file, "evil\n").expect("replace");
    let status = stdout_of(&ws, &["status", "p.yaml"]);
    assert!(status.contains("found broken and set aside"), "{status}");
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0);
    assert_eq!(with_outcome(&events, "executed"), ["make"]);
    let copy = output_dir(&ws, "p.yaml", "use").join("copy.txt");
    assert_eq!(std::fs::read_to_string(&copy).expect("read"), "good\n");
    let verify = ws.run(&["cache", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", stdout(&verify));

    // Both the output folder and the blob gone: a miss, not "cached" forever.
    let dir = output_dir(&ws, "p.yaml", "make");
    let blobs = ws.cache().join("v1/blobs");
    let digest = blake3::hash(b"good\n").to_hex().to_string();
    let mut perms = std::fs::metadata(&dir).expect("dir").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&dir, perms).expect("chmod");
    std::fs::remove_dir_all(&dir).expect("rm out");
    std::fs::remove_file(blobs.join(&digest[..2]).join(&digest)).expect("rm blob");
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0, "{events:?}");
    assert_eq!(with_outcome(&events, "executed"), ["make"]);
}

/// A run that takes over the lock of a holder that died kills the stage group the holder's
/// lock file records, if it still runs: here a `sleep` in a session of its own, as a process
/// that escaped its guard would be.
#[test]
fn taking_over_a_dead_holders_lock_kills_the_group_it_left_running() {
    let ws = Workspace::new();
    ws.write(
        "p.yaml",
        "name: takeover\nstages:\n  - id: s\n    kind: command\n    cmd: \"echo ok > $AUTOSCALE_OUT/r\"\n",
    );
    let status: Vec<serde_json::Value> = stdout_of(&ws, &["--json", "status", "p.yaml"])
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let key = status
        .iter()
        .find_map(|e| e["state"]["key"].as_str().or(e["key"].as_str()))
        .expect("the stage's key")
        .to_string();
    // The escaped writer: a group of its own, still running. (Waited for below; a panic on the
    // way leaves a `sleep 60` behind, which is harmless.)
    #[allow(clippy::zombie_processes)]
    let mut stray = std::process::Command::new("setsid")
        .args(["sleep", "60"])
        .spawn()
        .expect("spawn setsid sleep");
    let pgid = stray.id() as i32;
    std::thread::sleep(Duration::from_millis(100));
    let stat = std::fs::read_to_string(format!("/proc/{pgid}/stat")).expect("stat");
    let start: u64 = stat[stat.rfind(')').expect(")") + 1..]
        .split_whitespace()
        .nth(19)
        .expect("field 22")
        .parse()
        .expect("start time");
    // Its holder: a process that has exited.
    let mut dead = std::process::Command::new("true").spawn().expect("true");
    let dead_pid = dead.id();
    dead.wait().expect("wait");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    let lock = ws
        .cache()
        .join("v1/locks")
        .join(&key[..2])
        .join(format!("{key}.lock"));
    std::fs::create_dir_all(lock.parent().expect("parent")).expect("mkdir");
    let record = serde_json::json!({
        "pid": dead_pid, "host": host.trim(), "since_unix": 0, "label": "takeover/s",
        "group": {"pgid": pgid, "leader_start": start},
    });
    std::fs::write(&lock, record.to_string()).expect("write the lock file");
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0, "{events:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut gone = None;
    while Instant::now() < deadline {
        gone = stray.try_wait().expect("try_wait");
        if gone.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if gone.is_none() {
        let _ = stray.kill();
        let _ = stray.wait();
    }
    assert!(gone.is_some(), "the dead holder's group was killed");
}
