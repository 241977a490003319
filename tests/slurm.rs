//! `--executor slurm` against a real Slurm: the single-node cluster `tests/slurm/cluster.sh`
//! starts from Debian's packages (tests/run.sh starts it and exports `SLURM_CONF`), with four
//! fake GPUs and no accounting (`sacct` is off, so job states come from `squeue`).
//!
//! Without `sbatch` answering, every test says so and returns, unless
//! `AUTOSCALE_REQUIRE_SLURM=1` (tests/run.sh, CI), which fails them. The tests share the cluster,
//! so they run one at a time; each has its own workspace and cache.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Workspace, events, stderr, with_outcome};
use serde_json::Value;

static CLUSTER: Mutex<()> = Mutex::new(());

/// Whether the cluster answers; skips loudly unless required.
fn cluster() -> bool {
    let ok = Command::new("sinfo")
        .args(["--noheader", "--format=%t"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if !ok {
        assert!(
            std::env::var_os("AUTOSCALE_REQUIRE_SLURM").is_none(),
            "AUTOSCALE_REQUIRE_SLURM is set, but `sinfo` does not answer (start tests/slurm/cluster.sh and export SLURM_CONF)"
        );
        eprintln!("skipped: no Slurm cluster answers `sinfo`");
    }
    ok
}

/// A workspace whose runs go to Slurm, polling fast.
fn slurm_workspace(extra: &str) -> Workspace {
    let ws = Workspace::new();
    ws.write(
        "autoscale.toml",
        &format!(
            "executor = \"slurm\"\n[slurm]\npoll_min_s = 0.5\npoll_max_s = 2.0\nvanish_s = 60.0\nresult_grace_s = 10.0\n{extra}"
        ),
    );
    ws
}

/// Job name → how many jobs of that name Slurm knows (finished ones stay for `MinJobAge`).
fn jobs_by_name() -> BTreeMap<String, usize> {
    let out = Command::new("squeue")
        .args(["--noheader", "--states=all", "--format=%j"])
        .output()
        .expect("squeue");
    let mut names = BTreeMap::new();
    for name in String::from_utf8_lossy(&out.stdout).lines() {
        *names.entry(name.trim().to_string()).or_insert(0) += 1;
    }
    names
}

/// How many jobs named `name` Slurm knows now and did not know `before`.
fn new_jobs(before: &BTreeMap<String, usize>, now: &BTreeMap<String, usize>, name: &str) -> usize {
    now.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
}

/// Each of `names` was submitted exactly once since `before`.
fn one_new_job_each<'n>(before: &BTreeMap<String, usize>, names: impl Iterator<Item = &'n String>) {
    let jobs = jobs_by_name();
    for name in names {
        assert_eq!(
            new_jobs(before, &jobs, name),
            1,
            "one job for {name}: {jobs:?}"
        );
    }
}

/// Active (pending or running) jobs with one of `names`.
fn active_jobs(names: &BTreeSet<String>) -> Vec<String> {
    let out = Command::new("squeue")
        .args(["--noheader", "--format=%i %j %T"])
        .output()
        .expect("squeue");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|n| names.contains(n))
        })
        .map(str::to_string)
        .collect()
}

/// Stage id → key, from the `finished` events.
fn keys(events: &[Value]) -> BTreeMap<String, String> {
    events
        .iter()
        .filter(|e| e["event"] == "finished")
        .filter_map(|e| {
            Some((
                e["stage"].as_str()?.to_string(),
                e["key"].as_str()?.to_string(),
            ))
        })
        .collect()
}

fn job_name(key: &str) -> String {
    format!("as-{}", &key[..16])
}

/// Every file of a stage's cached output, by relative path.
fn outputs(ws: &Workspace, cache: &Path, stage: &str) -> BTreeMap<String, String> {
    let out = ws
        .cmd(&["--json", "show", "p.yaml", stage])
        .env("AUTOSCALE_CACHE_DIR", cache)
        .output()
        .expect("show");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let shown: Value = serde_json::from_slice(&out.stdout).expect("json");
    let dir = Path::new(shown["dir"].as_str().expect("dir")).to_path_buf();
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            files.insert(
                path.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                std::fs::read_to_string(&path).unwrap_or_default(),
            );
        }
    }
    files
}

const PIPELINE: &str = r#"
name: slurm
stages:
  - id: source
    kind: command
    cmd: 'echo "{\"children\": [{\"id\": \"a\", \"params\": {\"n\": 2}}, {\"id\": \"b\", \"params\": {\"n\": 3}}]}" > $AUTOSCALE_OUT/fanout.json; echo words > $AUTOSCALE_OUT/text.txt'
  - id: each
    kind: command
    foreach: [x, y]
    inputs: {text: source/text.txt}
    cmd: 'cat $AUTOSCALE_INPUT_TEXT > $AUTOSCALE_OUT/out.txt; echo ${item} >> $AUTOSCALE_OUT/out.txt'
  - id: dyn
    kind: command
    fanout: source
    cmd: 'seq $AUTOSCALE_PARAM_N > $AUTOSCALE_OUT/seq.txt'
  - id: join
    kind: command
    inputs: {each: each, dyn: dyn}
    cmd: 'cat $AUTOSCALE_INPUT_EACH/*/out.txt $AUTOSCALE_INPUT_DYN/*/seq.txt > $AUTOSCALE_OUT/all.txt'
"#;

#[test]
fn slurm_and_local_runs_give_the_same_keys_and_outputs_and_a_rerun_submits_nothing() {
    let _one = CLUSTER.lock();
    if !cluster() {
        return;
    }
    let ws = slurm_workspace("");
    ws.write("p.yaml", PIPELINE);
    let before = jobs_by_name();
    let (code, slurm_events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0, "{slurm_events:?}");
    let executed = with_outcome(&slurm_events, "executed");
    assert_eq!(executed.len(), 6, "{executed:?}");
    let slurm_keys = keys(&slurm_events);
    // Every stage ran as exactly one job, named after its key.
    let jobs = jobs_by_name();
    for (stage, key) in &slurm_keys {
        assert_eq!(
            new_jobs(&before, &jobs, &job_name(key)),
            1,
            "{stage}: {jobs:?}"
        );
    }

    let local = ws.path().join("local-cache");
    let out = ws
        .cmd(&["--json", "run", "p.yaml", "--executor", "local"])
        .env("AUTOSCALE_CACHE_DIR", &local)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let local_events = events(&out);
    assert_eq!(keys(&local_events), slurm_keys, "the same keys either way");
    for stage in slurm_keys.keys() {
        assert_eq!(
            outputs(&ws, &ws.cache(), stage),
            outputs(&ws, &local, stage),
            "{stage}"
        );
    }

    let (code, again) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0);
    assert!(with_outcome(&again, "executed").is_empty(), "{again:?}");
    assert_eq!(jobs_by_name(), jobs, "a second run submits nothing");
}

#[test]
fn eight_one_gpu_stages_share_the_four_gpus_one_job_per_device() {
    let _one = CLUSTER.lock();
    if !cluster() {
        return;
    }
    let ws = slurm_workspace("");
    let trace = ws.path().join("trace");
    std::fs::create_dir_all(&trace).expect("mkdir");
    ws.write("p.yaml", &common::gpu_trace_pipeline(&trace, 8, 2.0));
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0, "{events:?}");
    let spans = common::gpu_spans(&trace, 8);
    let devices: BTreeSet<&str> = spans.iter().map(|s| s.2.as_str()).collect();
    assert!(
        devices.len() >= 2,
        "the jobs spread over the devices: {spans:?}"
    );
}

/// Runs a one-stage pipeline of `cmd` (and YAML lines `stage_extra`) through Slurm; it must
/// exit 1 and say each of `expected`. Returns how many jobs it submitted.
fn failing_run(stage_extra: &str, cmd: &str, expected: &[&str]) -> usize {
    let ws = slurm_workspace("");
    ws.write(
        "p.yaml",
        &format!(
            "name: fail\nstages:\n  - id: bad\n    kind: command\n    cmd: '{cmd}'\n{stage_extra}"
        ),
    );
    let out = ws.run(&["run", "p.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    for word in expected {
        assert!(text.contains(word), "{word}: {text}");
    }
    // One log per job.
    std::fs::read_dir(ws.cache().join("slurm").join("logs")).map_or(0, Iterator::count)
}

#[test]
fn a_failing_job_fails_the_stage_with_its_log_tail() {
    let _one = CLUSTER.lock();
    if cluster() {
        let jobs = failing_run(
            "    retries: 1\n",
            "echo the-marker-line; exit 3",
            &["the-marker-line", "FAILED", "retrying"],
        );
        assert_eq!(jobs, 2, "a failed job is retried under `retries`");
    }
}

/// Starts `autoscale run p.yaml` in the background and waits until `n` of its jobs run; the
/// caller waits for (or kills) the head.
#[allow(clippy::zombie_processes)]
fn start_and_wait_for_jobs(ws: &Workspace, n: usize) -> (std::process::Child, Vec<String>) {
    let child = ws
        .cmd(&["--json", "run", "p.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    let journal = ws.cache().join("slurm").join("jobs");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let names: BTreeSet<String> = std::fs::read_dir(&journal)
            .map(|d| {
                d.filter_map(|e| {
                    let name = e.ok()?.file_name().to_string_lossy().into_owned();
                    let key = name.strip_suffix(".json")?;
                    Some(job_name(key))
                })
                .collect()
            })
            .unwrap_or_default();
        let running: Vec<String> = active_jobs(&names)
            .into_iter()
            .filter(|l| l.ends_with("RUNNING"))
            .collect();
        if running.len() >= n {
            return (child, names.into_iter().collect());
        }
        assert!(
            Instant::now() < deadline,
            "the jobs did not start: {running:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const SLEEPERS: &str = r#"
name: sleepers
stages:
  - id: nap
    kind: command
    foreach: [a, b]
    cmd: 'sleep 6; echo ${item} > $AUTOSCALE_OUT/x'
"#;

#[test]
fn a_killed_head_reattaches_to_its_jobs_and_submits_no_duplicate() {
    let _one = CLUSTER.lock();
    if !cluster() {
        return;
    }
    let ws = slurm_workspace("");
    ws.write("p.yaml", SLEEPERS);
    let before = jobs_by_name();
    let (mut head, names) = start_and_wait_for_jobs(&ws, 2);
    head.kill().expect("SIGKILL");
    let _ = head.wait();
    // The jobs outlive the head: they belong to the cluster.
    assert_eq!(active_jobs(&names.iter().cloned().collect()).len(), 2);
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0, "{events:?}");
    assert_eq!(with_outcome(&events, "executed").len(), 2, "{events:?}");
    one_new_job_each(&before, names.iter());
}

#[test]
fn ctrl_c_cancels_every_job_of_the_run() {
    let _one = CLUSTER.lock();
    if !cluster() {
        return;
    }
    let ws = slurm_workspace("");
    ws.write("p.yaml", &SLEEPERS.replace("sleep 6", "sleep 120"));
    let (mut head, names) = start_and_wait_for_jobs(&ws, 2);
    // SIGINT, as Ctrl-C sends it.
    let sent = Command::new("kill")
        .args(["-INT", &head.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let status = head.wait().expect("wait");
    assert_eq!(status.code(), Some(130));
    let names: BTreeSet<String> = names.into_iter().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !active_jobs(&names).is_empty() {
        assert!(
            Instant::now() < deadline,
            "jobs left: {:?}",
            active_jobs(&names)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_job_cancelled_from_outside_fails_its_stage() {
    let _one = CLUSTER.lock();
    if !cluster() {
        return;
    }
    let ws = slurm_workspace("");
    ws.write(
        "p.yaml",
        "name: outside\nstages:\n  - id: long\n    kind: command\n    cmd: 'sleep 120'\n",
    );
    let (head, names) = start_and_wait_for_jobs(&ws, 1);
    let ids: Vec<String> = active_jobs(&names.into_iter().collect())
        .iter()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    let status = Command::new("scancel")
        .args(&ids)
        .status()
        .expect("scancel");
    assert!(status.success());
    let out = head.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1));
    let log = ws.run(&["status", "p.yaml"]);
    assert!(
        String::from_utf8_lossy(&log.stdout).contains("failed last run"),
        "{}",
        String::from_utf8_lossy(&log.stdout)
    );
}

#[test]
fn jobs_with_a_cache_of_their_own_reach_the_head_through_the_remote() {
    let _one = CLUSTER.lock();
    if !cluster() {
        return;
    }
    let probe = Workspace::new();
    let node_cache = probe.path().join("node-cache");
    let remote = probe.path().join("remote");
    std::fs::create_dir_all(&remote).expect("mkdir");
    let ws = slurm_workspace(&format!(
        "cache_dir = \"{}\"\nremote = \"{}\"\n[remote]\nurl = \"{}\"\nmode = \"read-only\"\n",
        node_cache.display(),
        remote.display(),
        remote.display()
    ));
    ws.write("p.yaml", PIPELINE);
    let (code, events) = ws.run_json(&["p.yaml"]);
    assert_eq!(code, 0, "{events:?}");
    assert_eq!(with_outcome(&events, "executed").len(), 6, "{events:?}");
    // The head's cache holds what it downloaded from the remote; the jobs wrote only theirs.
    let all = outputs(&ws, &ws.cache(), "join");
    assert_eq!(all["all.txt"], "words\nx\nwords\ny\n1\n2\n1\n2\n3\n");
    assert!(node_cache.join("v1").is_dir(), "the jobs' own cache");
}

#[test]
fn a_job_past_its_time_limit_fails_its_stage_with_the_reason() {
    // No cluster lock: one CPU, no GPU, its own job names; it mostly waits for Slurm's minute.
    if cluster() {
        // The stage's own `slurm:` sets the limit; a retry would time out again.
        let jobs = failing_run(
            "    retries: 2\n    slurm: {time: \"1\"}\n",
            "echo started; sleep 300",
            &["TIMEOUT", "raise `time`"],
        );
        assert_eq!(jobs, 1, "no retry after a TIMEOUT");
    }
}

#[test]
fn two_heads_on_one_pipeline_submit_each_stage_once() {
    let _one = CLUSTER.lock();
    if !cluster() {
        return;
    }
    let ws = slurm_workspace("");
    ws.write("p.yaml", &SLEEPERS.replace("sleep 6", "sleep 3"));
    let before = jobs_by_name();
    let heads: Vec<_> = (0..2)
        .map(|_| {
            ws.cmd(&["--json", "run", "p.yaml"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start")
        })
        .collect();
    let mut names = BTreeSet::new();
    for head in heads {
        let out = head.wait_with_output().expect("wait");
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        for key in keys(&events(&out)).values() {
            names.insert(job_name(key));
        }
    }
    assert_eq!(names.len(), 2, "{names:?}");
    one_new_job_each(&before, names.iter());
}

/// The embedded demo at CI size, every stage a Slurm job (the trainings run the trainer binary
/// on the node); the result is the one a local run gives, by key.
#[test]
fn the_tiny_smoke_pipeline_runs_through_slurm() {
    let _one = CLUSTER.lock();
    if !cluster() || common::trainer().is_none() {
        return;
    }
    let ws = slurm_workspace("");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (p, o) = (
        repo.join("pipelines/tiny.yaml"),
        repo.join("pipelines/smoke.yaml"),
    );
    let args = [
        p.to_str().expect("utf8"),
        "--with",
        o.to_str().expect("utf8"),
    ];
    let (code, events) = ws.run_json(&args);
    let failed: Vec<_> = events.iter().filter(|e| e["outcome"] == "failed").collect();
    assert_eq!(code, 0, "{failed:?}");
    let executed = with_outcome(&events, "executed");
    assert_eq!(executed.len(), 59, "{executed:?}");
    assert!(executed.contains(&"report".to_string()));
    let (code, again) = ws.run_json(&args);
    assert_eq!(code, 0);
    assert!(with_outcome(&again, "executed").is_empty());
}
