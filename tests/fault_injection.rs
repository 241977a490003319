//! Fault injection: `autoscale run` is SIGKILLed at random points of a pipeline of command
//! stages (0.05-1.5 s each, several with background subprocesses), then rerun at once. Every
//! trial checks that
//!
//! - no stage process outlives the engine (each trial's processes carry a token in their
//!   environment, `FI_TOKEN`, and `/proc` is scanned for it, with a grace of 2 s for the guard
//!   shells to act on the engine's death);
//! - the rerun completes and every stage's output tree is byte for byte the clean run's;
//! - `autoscale cache verify` reports no problem.
//!
//! All trials share one cache. Each trial sets a fresh `salt` param, which every stage's key
//! includes but no output depends on, so every trial runs the whole pipeline again over a
//! cache full of earlier trials' results, blobs (deduplicated across keys) and whatever their
//! kills left behind; now and then a trial reuses an earlier salt and must be answered from
//! the cache.
//!
//! `AUTOSCALE_FAULT_TRIALS` (default 50) sets the number of trials, `AUTOSCALE_FAULT_SEED` the
//! seed (default: from the clock; printed either way). Run with `--nocapture` to see the
//! per-trial lines and the summary:
//!
//! ```sh
//! AUTOSCALE_FAULT_TRIALS=500 cargo test --locked --test fault_injection -- --nocapture
//! ```
#![cfg(target_os = "linux")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use autoscale_cache::ActionKey;
use common::Workspace;
use serde_json::Value;

/// Ten command stages: two sources, a three-way fan-out, a fan-in, a side branch, a chain of
/// two, and a final fan-in of everything. Every output depends on the stage's inputs, and each
/// stage writes its files in parts with sleeps between them, so that a writer left over from a
/// killed attempt would corrupt a result. `src_b`, `fan`, `side` and `deep2` do part of their
/// work in background subshells (`side` nests them two deep), so killing the stage's `sh` alone
/// would leave writers behind. Sleeps come from `FI_*` variables the engine passes through
/// (not declared in `env:`, so not part of any key): each trial draws its own durations
/// without changing a key or an output.
const PIPELINE: &str = r#"
name: fault
params:
  salt: 0
stages:
  - id: src_a
    kind: command
    params: {salt: "${params.salt}"}
    cmd: |
      seq 1 400 > $AUTOSCALE_OUT/a.txt
      sleep $FI_SRC_A
      seq 401 800 >> $AUTOSCALE_OUT/a.txt
      sleep $FI_SRC_A
      echo end-a >> $AUTOSCALE_OUT/a.txt
    outputs: [a.txt]
  - id: src_b
    kind: command
    params: {salt: "${params.salt}"}
    cmd: |
      (echo b1 > $AUTOSCALE_OUT/b1.txt; sleep $FI_SRC_B; seq 1 300 | sed 's/$/ b1/' >> $AUTOSCALE_OUT/b1.txt) &
      (sleep $FI_SRC_B; echo b2 > $AUTOSCALE_OUT/b2.txt; sleep $FI_SRC_B; seq 5 5 500 >> $AUTOSCALE_OUT/b2.txt) &
      wait
    outputs: [b1.txt, b2.txt]
  - id: fan
    kind: command
    foreach: [p, q, r]
    params: {salt: "${params.salt}", item: "${item}"}
    inputs: {a: src_a/a.txt}
    cmd: |
      eval "d=\$FI_FAN_$AUTOSCALE_PARAM_ITEM"
      (sleep $d; sed "s/^/$AUTOSCALE_PARAM_ITEM-bg /" $AUTOSCALE_INPUT_A > $AUTOSCALE_OUT/bg.txt; sleep $d; echo bg-done >> $AUTOSCALE_OUT/bg.txt) &
      head -n 300 $AUTOSCALE_INPUT_A | sed "s/^/$AUTOSCALE_PARAM_ITEM /" > $AUTOSCALE_OUT/part.txt
      sleep $d
      tail -n 300 $AUTOSCALE_INPUT_A | sed "s/^/$AUTOSCALE_PARAM_ITEM /" >> $AUTOSCALE_OUT/part.txt
      wait
    outputs: [part.txt, bg.txt]
  - id: join
    kind: command
    params: {salt: "${params.salt}"}
    inputs: {parts: fan, b: src_b}
    cmd: |
      for f in $AUTOSCALE_INPUT_PARTS/*; do cat "$f/part.txt" "$f/bg.txt"; done > $AUTOSCALE_OUT/joined.txt
      sleep $FI_JOIN
      cat $AUTOSCALE_INPUT_B/b1.txt $AUTOSCALE_INPUT_B/b2.txt >> $AUTOSCALE_OUT/joined.txt
      sleep $FI_JOIN
      cksum < $AUTOSCALE_OUT/joined.txt > $AUTOSCALE_OUT/sum.txt
    outputs: [joined.txt, sum.txt]
  - id: side
    kind: command
    params: {salt: "${params.salt}"}
    inputs: {b: src_b/b2.txt}
    cmd: |
      ( (sleep $FI_SIDE; tr 0-9 a-j < $AUTOSCALE_INPUT_B > $AUTOSCALE_OUT/letters.txt; sleep $FI_SIDE; echo inner-done >> $AUTOSCALE_OUT/letters.txt) & sleep $FI_SIDE; echo outer > $AUTOSCALE_OUT/outer.txt; wait; echo outer-done >> $AUTOSCALE_OUT/outer.txt ) &
      wait
    outputs: [letters.txt, outer.txt]
  - id: deep1
    kind: command
    params: {salt: "${params.salt}"}
    inputs: {j: join/joined.txt}
    cmd: |
      awk '{ n += length($0); print NR, n }' $AUTOSCALE_INPUT_J > $AUTOSCALE_OUT/acc.txt
      sleep $FI_DEEP1
      wc -l < $AUTOSCALE_INPUT_J > $AUTOSCALE_OUT/count.txt
      sleep $FI_DEEP1
      echo deep1-done >> $AUTOSCALE_OUT/count.txt
    outputs: [acc.txt, count.txt]
  - id: deep2
    kind: command
    params: {salt: "${params.salt}"}
    inputs: {acc: deep1, y: "fan[q]/part.txt"}
    cmd: |
      tail -n 5 $AUTOSCALE_INPUT_ACC/acc.txt > $AUTOSCALE_OUT/tail.txt
      (sleep $FI_DEEP2; sleep $FI_DEEP2; wc -c < $AUTOSCALE_INPUT_Y > $AUTOSCALE_OUT/ysize.txt) &
      sleep $FI_DEEP2
      cat $AUTOSCALE_INPUT_ACC/count.txt >> $AUTOSCALE_OUT/tail.txt
      wait
    outputs: [tail.txt, ysize.txt]
  - id: final
    kind: command
    params: {salt: "${params.salt}"}
    inputs: {j: join, s: side, d: deep2, a: src_a/a.txt}
    cmd: |
      cat $AUTOSCALE_INPUT_J/sum.txt > $AUTOSCALE_OUT/final.txt
      sleep $FI_FINAL
      for d in $AUTOSCALE_INPUT_S $AUTOSCALE_INPUT_D; do (cd $d && ls && cat *); done | cksum >> $AUTOSCALE_OUT/final.txt
      sleep $FI_FINAL
      cksum < $AUTOSCALE_INPUT_A >> $AUTOSCALE_OUT/final.txt
    outputs: [final.txt]
"#;

/// Each stage: its id, the variable that holds half its duration (every stage sleeps it twice
/// on its longest path), and the stages it waits on.
const STAGES: &[(&str, &str, &[&str])] = &[
    ("src_a", "FI_SRC_A", &[]),
    ("src_b", "FI_SRC_B", &[]),
    ("fan[p]", "FI_FAN_p", &["src_a"]),
    ("fan[q]", "FI_FAN_q", &["src_a"]),
    ("fan[r]", "FI_FAN_r", &["src_a"]),
    ("join", "FI_JOIN", &["fan[p]", "fan[q]", "fan[r]", "src_b"]),
    ("side", "FI_SIDE", &["src_b"]),
    ("deep1", "FI_DEEP1", &["join"]),
    ("deep2", "FI_DEEP2", &["deep1", "fan[q]"]),
    ("final", "FI_FINAL", &["join", "side", "deep2", "src_a"]),
];

/// How long the stage processes of a killed engine may take to disappear.
const GRACE: Duration = Duration::from_secs(2);
const JOBS: &str = "4";

/// SplitMix64: small, seeded, good enough to pick kill points.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A stage's duration: most short (0.05-0.2 s), some long (up to 1.5 s).
fn draw_duration(rng: &mut Rng) -> f64 {
    if rng.unit() < 0.85 {
        rng.range(0.05, 0.2)
    } else {
        rng.range(0.2, 1.5)
    }
}

/// The pipeline's expected length with these durations and unlimited parallelism.
fn critical_path(durations: &[f64]) -> f64 {
    let mut finish = vec![0.0f64; STAGES.len()];
    for (i, (_, _, deps)) in STAGES.iter().enumerate() {
        let start = deps
            .iter()
            .map(|d| finish[STAGES.iter().position(|s| s.0 == *d).expect("dep")])
            .fold(0.0, f64::max);
        finish[i] = start + durations[i] + 0.03;
    }
    finish.iter().copied().fold(0.0, f64::max)
}

fn duration_env(durations: &[f64]) -> Vec<(String, String)> {
    STAGES
        .iter()
        .zip(durations)
        .map(|((_, var, _), d)| (var.to_string(), format!("{:.3}", d / 2.0)))
        .collect()
}

/// Live (not zombie) processes whose environment holds `FI_TOKEN=token`, with their command
/// lines.
fn tagged_processes(token: &str) -> Vec<(u32, String)> {
    let needle = format!("FI_TOKEN={token}");
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !environ.split(|b| *b == 0).any(|e| e == needle.as_bytes()) {
            continue;
        }
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next())
            });
        if matches!(state, Some('Z' | 'X') | None) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        found.push((
            pid,
            format!("{pid} [{}] {}", state.unwrap_or('?'), cmdline.trim()),
        ));
    }
    found
}

/// Waits until [`GRACE`] after `since` for every process tagged `token` to go. Returns how
/// long after `since` that was,
/// or the survivors (which are then killed, so they do not disturb the next trial).
fn wait_for_no_tagged(token: &str, since: Instant) -> Result<Duration, Vec<String>> {
    let start = since;
    loop {
        let left = tagged_processes(token);
        if left.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > GRACE {
            for (pid, _) in &left {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            return Err(left.into_iter().map(|(_, d)| d).collect());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every file under `dir`, by path relative to it.
fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .expect("under root")
                    .to_string_lossy()
                    .into_owned();
                out.insert(
                    rel,
                    std::fs::read(&path).unwrap_or_else(|e| e.to_string().into()),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn parse_events(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Stage id -> (outcome, key) from a run's `finished` events.
fn finished(events: &[Value]) -> BTreeMap<String, (String, Option<ActionKey>)> {
    events
        .iter()
        .filter(|e| e["event"] == "finished")
        .filter_map(|e| {
            let stage = e["stage"].as_str()?.to_string();
            let outcome = e["outcome"].as_str().unwrap_or("?").to_string();
            let key = e["key"].as_str().and_then(|k| k.parse().ok());
            Some((stage, (outcome, key)))
        })
        .collect()
}

struct Harness {
    ws: Workspace,
    reference: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

impl Harness {
    fn engine(
        &self,
        cache: &Path,
        salt: u64,
        token: &str,
        durations: &[f64],
    ) -> std::process::Command {
        let salt = format!("salt={salt}");
        let mut cmd = self
            .ws
            .cmd(&["--json", "run", "p.yaml", "--jobs", JOBS, "--set", &salt]);
        cmd.env("AUTOSCALE_CACHE_DIR", cache)
            .env("FI_TOKEN", token)
            .env("LC_ALL", "C")
            .envs(duration_env(durations))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the pipeline to completion (two minutes at most); its exit code and events, or why
    /// it did not complete.
    fn run_to_end(
        &self,
        cache: &Path,
        salt: u64,
        token: &str,
        durations: &[f64],
    ) -> Result<(i32, Vec<Value>, String), String> {
        let out_path = self.ws.path().join(format!("{token}.out"));
        let err_path = self.ws.path().join(format!("{token}.err"));
        let mut child = self
            .engine(cache, salt, token, durations)
            .stdout(File::create(&out_path).expect("out file"))
            .stderr(File::create(&err_path).expect("err file"))
            .spawn()
            .expect("spawn autoscale");
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the run did not finish within 120 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        let _ = std::fs::remove_file(&out_path);
        let _ = std::fs::remove_file(&err_path);
        Ok((status.code().unwrap_or(-1), parse_events(&stdout), stderr))
    }

    fn outputs_of(
        &self,
        cache: &Path,
        done: &BTreeMap<String, (String, Option<ActionKey>)>,
    ) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
        done.iter()
            .filter_map(|(stage, (_, key))| {
                let dir = autoscale_cache::entry_paths(cache, key.as_ref()?).1;
                Some((stage.clone(), read_tree(&dir)))
            })
            .collect()
    }

    fn verify(&self, cache: &Path) -> (usize, usize, String) {
        let out = self
            .ws
            .cmd(&["--json", "cache", "verify"])
            .env("AUTOSCALE_CACHE_DIR", cache)
            .output()
            .expect("run verify");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match serde_json::from_str::<Value>(text.trim()) {
            Ok(v) => (
                v["problems"].as_array().map_or(usize::MAX, Vec::len),
                v["stale_staging"].as_array().map_or(0, Vec::len),
                text,
            ),
            Err(_) => (1, 0, format!("unreadable verify output: {text}")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    /// At a uniform time over the run's expected length.
    Time,
    /// Just after a stage is reported started: its spawn, its guard's setup.
    AfterStart,
    /// Around the moment a stage's command should exit: reaping, hashing, committing.
    NearEnd,
}

#[derive(Default)]
struct Totals {
    trials: usize,
    kills_sent: usize,
    kills_mid_run: usize,
    stages_in_flight: usize,
    processes_at_kill: usize,
    by_mode: BTreeMap<String, (usize, usize)>,
    wrong_outputs: usize,
    orphans: usize,
    verify_problems: usize,
    rerun_failures: usize,
    stale_staging: usize,
    reruns_executed: usize,
    reruns_cached: usize,
    slowest_cleanup: Duration,
    failures: Vec<String>,
}

#[test]
fn sigkill_at_random_points_leaves_no_orphan_no_wrong_output_and_a_clean_cache() {
    let trials: usize = std::env::var("AUTOSCALE_FAULT_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let seed: u64 = std::env::var("AUTOSCALE_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!(
        "fault_injection: seed {seed} (rerun with AUTOSCALE_FAULT_SEED={seed}), {trials} trials"
    );
    let mut rng = Rng(seed);
    let started = Instant::now();

    let ws = Workspace::new();
    // A check of the checker: with AUTOSCALE_FAULT_ESCAPE=1 one stage leaves a process in a
    // session of its own (`setsid`), out of reach of its group's kill; the test must then
    // report orphans and fail.
    let escape = std::env::var_os("AUTOSCALE_FAULT_ESCAPE").is_some_and(|v| v == "1");
    let pipeline = if escape {
        eprintln!(
            "fault_injection: AUTOSCALE_FAULT_ESCAPE=1: `src_b` leaves a setsid'd sleep behind"
        );
        PIPELINE.replacen(
            "      wait\n    outputs: [b1.txt, b2.txt]",
            "      (setsid sleep 4 < /dev/null > /dev/null 2>&1 &)\n      wait\n    outputs: [b1.txt, b2.txt]",
            1,
        )
    } else {
        PIPELINE.to_string()
    };
    assert!(!escape || pipeline != PIPELINE, "the escape was put in");
    ws.write("p.yaml", &pipeline);
    let mut h = Harness {
        ws,
        reference: BTreeMap::new(),
    };

    // The clean run: its own cache, shortest sleeps, nothing killed.
    let ref_cache = h.ws.path().join("ref-cache");
    let short = vec![0.05; STAGES.len()];
    let (code, events, stderr) = h
        .run_to_end(&ref_cache, 0, "ref", &short)
        .expect("clean run");
    assert_eq!(code, 0, "the clean run failed: {stderr}");
    let done = finished(&events);
    assert_eq!(
        done.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        STAGES.iter().map(|s| s.0).collect::<BTreeSet<_>>(),
        "{events:?}"
    );
    h.reference = h.outputs_of(&ref_cache, &done);
    for (stage, files) in &h.reference {
        assert!(!files.is_empty(), "the clean run's `{stage}` has outputs");
    }

    let cache = h.ws.cache();
    let mut t = Totals::default();
    if let Err(survivors) = wait_for_no_tagged("ref", Instant::now()) {
        t.orphans += survivors.len();
        t.failures.push(format!(
            "the clean run left {} processes behind: {survivors:?}",
            survivors.len()
        ));
    }
    for trial in 0..trials {
        t.trials += 1;
        // Mostly a new salt (every stage runs again); sometimes an earlier one (all cached).
        let salt = if trial > 0 && rng.unit() < 0.1 {
            1 + rng.below(trial) as u64
        } else {
            1 + trial as u64
        };
        let durations: Vec<f64> = (0..STAGES.len()).map(|_| draw_duration(&mut rng)).collect();
        let mode = match rng.below(10) {
            0..=5 => Mode::Time,
            6 | 7 => Mode::AfterStart,
            _ => Mode::NearEnd,
        };
        let victim = rng.below(STAGES.len());
        let cp = critical_path(&durations);
        let at = match mode {
            Mode::Time => rng.range(0.0, 1.02 * cp),
            Mode::AfterStart => rng.range(0.0, 0.015),
            Mode::NearEnd => durations[victim] + rng.range(-0.025, 0.025),
        };
        let token = format!("fi{}t{trial}", std::process::id());
        let mut line = format!(
            "trial {trial}: salt {salt} {mode:?} {} {at:.3}s (path {cp:.2}s)",
            if mode == Mode::Time {
                ""
            } else {
                STAGES[victim].0
            }
        );

        // 1. The run to kill.
        let mut child = h
            .engine(&cache, salt, &token, &durations)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn autoscale");
        let engine_pid = child.id();
        let events = spawn_reader(&mut child);
        let spawned = Instant::now();
        let mut running: BTreeSet<String> = BTreeSet::new();
        let mut killed_at = Instant::now();
        let mut sent = false;
        let kill_at =
            wait_for_kill_point(&events, &mut running, mode, STAGES[victim].0, at, spawned);
        let landed = match kill_at {
            KillPoint::Now if child.try_wait().expect("try_wait").is_none() => {
                let exposed = tagged_processes(&token)
                    .into_iter()
                    .filter(|(pid, _)| *pid != engine_pid)
                    .count();
                child.kill().expect("SIGKILL");
                killed_at = Instant::now();
                sent = true;
                t.kills_sent += 1;
                t.processes_at_kill += exposed;
                t.stages_in_flight += running.len();
                let mid = !running.is_empty() || exposed > 0;
                if mid {
                    t.kills_mid_run += 1;
                }
                let _ = write!(
                    line,
                    " | killed at {:.3}s, {} stages running, {exposed} processes",
                    spawned.elapsed().as_secs_f64(),
                    running.len()
                );
                mid
            }
            _ => {
                line.push_str(" | the run ended first");
                false
            }
        };
        let entry = t.by_mode.entry(format!("{mode:?}")).or_default();
        entry.0 += 1;
        entry.1 += usize::from(landed);
        let _ = child.wait();
        if !sent {
            killed_at = Instant::now();
        }

        // 2. Nothing of the killed run may survive the grace period.
        match wait_for_no_tagged(&token, killed_at) {
            Ok(took) if sent => {
                t.slowest_cleanup = t.slowest_cleanup.max(took);
                let _ = write!(line, ", gone in {} ms", took.as_millis());
            }
            Ok(_) => {}
            Err(survivors) => {
                t.orphans += survivors.len();
                t.failures.push(format!(
                    "trial {trial} (seed {seed}): {} processes outlived the killed engine by {GRACE:?}: {survivors:?}",
                    survivors.len()
                ));
            }
        }

        // What the reader still had (the channel closes with the engine's stdout).
        while events.recv_timeout(Duration::from_millis(200)).is_ok() {}

        // 3. An immediate rerun completes, leaves nothing running, and gives the clean outputs.
        let rerun_token = format!("{token}r");
        // Nothing is killed in the rerun: short stages keep a trial short.
        let rerun_durations: Vec<f64> = (0..STAGES.len()).map(|_| rng.range(0.05, 0.1)).collect();
        match h.run_to_end(&cache, salt, &rerun_token, &rerun_durations) {
            Ok((0, events, stderr)) => {
                let done = finished(&events);
                let executed = done.values().filter(|(o, _)| o == "executed").count();
                let cached = done.values().filter(|(o, _)| o == "cached").count();
                t.reruns_executed += executed;
                t.reruns_cached += cached;
                let _ = write!(line, " | rerun: {executed} executed, {cached} cached");
                let got = h.outputs_of(&cache, &done);
                for (stage, want) in &h.reference {
                    let problem = match got.get(stage) {
                        None => Some("no result (no key in the rerun's events)".to_string()),
                        Some(have) if have == want => None,
                        Some(have) => Some(describe_difference(want, have)),
                    };
                    if let Some(problem) = problem {
                        t.wrong_outputs += 1;
                        t.failures.push(format!(
                            "trial {trial} (seed {seed}): stage `{stage}` after the rerun: {problem}; stderr: {stderr}"
                        ));
                    }
                }
            }
            Ok((code, _, stderr)) => {
                t.rerun_failures += 1;
                t.failures.push(format!(
                    "trial {trial} (seed {seed}): the rerun exited {code}: {stderr}"
                ));
            }
            Err(e) => {
                t.rerun_failures += 1;
                t.failures.push(format!("trial {trial} (seed {seed}): {e}"));
            }
        }
        if let Err(survivors) = wait_for_no_tagged(&rerun_token, Instant::now()) {
            t.orphans += survivors.len();
            t.failures.push(format!(
                "trial {trial} (seed {seed}): {} processes outlived the rerun: {survivors:?}",
                survivors.len()
            ));
        }

        // 4. The cache checks out.
        let (problems, stale, text) = h.verify(&cache);
        t.stale_staging = stale;
        if problems > 0 {
            t.verify_problems += problems;
            t.failures
                .push(format!("trial {trial} (seed {seed}): cache verify: {text}"));
        }
        let _ = write!(line, " | verify: {problems} problems");
        eprintln!("{line}");
    }

    let summary = format!(
        "fault_injection summary: seed {seed}, {} trials in {:.0} s: {} kills sent, {} landed mid-run \
         ({} stages and {} stage processes running at those kills; by mode (trials, landed): {:?}), \
         slowest cleanup {} ms, reruns executed {} and reused {} stages; \
         wrong outputs {}, orphans {}, verify problems {}, failed reruns {} \
         (at the end: {} stale staging folders by verify, {} entries in the cache's tmp/)",
        t.trials,
        started.elapsed().as_secs_f64(),
        t.kills_sent,
        t.kills_mid_run,
        t.stages_in_flight,
        t.processes_at_kill,
        t.by_mode,
        t.slowest_cleanup.as_millis(),
        t.reruns_executed,
        t.reruns_cached,
        t.wrong_outputs,
        t.orphans,
        t.verify_problems,
        t.rerun_failures,
        t.stale_staging,
        std::fs::read_dir(cache.join("v1/tmp")).map_or(0, |d| d.count()),
    );
    eprintln!("{summary}");
    for f in &t.failures {
        eprintln!("FAILURE: {f}");
    }
    assert!(
        t.failures.is_empty(),
        "{} failures (see above); {summary}",
        t.failures.len()
    );
    assert!(
        trials < 10 || t.kills_mid_run * 2 >= trials,
        "too few kills landed while stages ran: {summary}"
    );
}

fn describe_difference(
    want: &BTreeMap<String, Vec<u8>>,
    have: &BTreeMap<String, Vec<u8>>,
) -> String {
    let want_files: Vec<&String> = want.keys().collect();
    let have_files: Vec<&String> = have.keys().collect();
    if want_files != have_files {
        return format!("files {have_files:?}, the clean run's {want_files:?}");
    }
    for (path, bytes) in want {
        let got = &have[path];
        if got != bytes {
            return format!(
                "`{path}` differs: {} bytes, the clean run's {}; starts {:?}",
                got.len(),
                bytes.len(),
                String::from_utf8_lossy(&got[..got.len().min(120)])
            );
        }
    }
    "differs".into()
}

/// The engine's stdout, one parsed JSON event per message; the channel closes at its end.
fn spawn_reader(child: &mut Child) -> Receiver<Value> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                break;
            }
        }
    });
    rx
}

enum KillPoint {
    Now,
    /// The engine's output ended first: it exited (or is about to).
    Ended,
}

/// Follows the events until the kill point of `mode`, keeping the set of running stages.
fn wait_for_kill_point(
    events: &Receiver<Value>,
    running: &mut BTreeSet<String>,
    mode: Mode,
    victim: &str,
    at: f64,
    spawned: Instant,
) -> KillPoint {
    let hard_deadline = spawned + Duration::from_secs(60);
    let mut deadline = match mode {
        Mode::Time => spawned + Duration::from_secs_f64(at.max(0.0)),
        _ => hard_deadline,
    };
    loop {
        let now = Instant::now();
        if now >= deadline {
            return KillPoint::Now;
        }
        match events.recv_timeout(deadline - now) {
            Ok(e) => {
                let stage = e["stage"].as_str().unwrap_or_default().to_string();
                if e["event"] == "started" {
                    running.insert(stage.clone());
                    if mode != Mode::Time && stage == victim {
                        deadline = Instant::now() + Duration::from_secs_f64(at.max(0.0));
                    }
                } else if e["event"] == "finished" {
                    running.remove(&stage);
                }
            }
            Err(RecvTimeoutError::Timeout) => return KillPoint::Now,
            Err(RecvTimeoutError::Disconnected) => return KillPoint::Ended,
        }
    }
}
