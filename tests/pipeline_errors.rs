//! Every class of bad pipeline gets a message with its file, line and column, a hint, and exit
//! status 2. The messages are snapshots: a change to one is a change a user sees.

mod common;

use common::{Workspace, stderr};

/// Runs `autoscale status` on a pipeline and returns (exit code, stderr with the temp dir hidden).
fn check(yaml: &str, extra: &[&str]) -> (Option<i32>, String) {
    let ws = Workspace::new();
    ws.write("pipe.yaml", yaml);
    let mut args = vec!["status", "pipe.yaml"];
    args.extend_from_slice(extra);
    let out = ws.run(&args);
    let text = stderr(&out).replace(&ws.path().display().to_string(), "[WS]");
    (out.status.code(), text)
}

fn assert_bad(name: &str, yaml: &str, extra: &[&str]) {
    let (code, text) = check(yaml, extra);
    assert_eq!(code, Some(2), "bad input exits 2:\n{text}");
    assert!(!text.contains("panicked"), "{text}");
    insta::assert_snapshot!(name, text);
}

#[test]
fn unknown_stage_kind_suggests_the_closest() {
    assert_bad(
        "unknown_kind",
        "name: p\nstages:\n  - id: a\n    kind: comand\n    cmd: \"true\"\n",
        &[],
    );
}

#[test]
fn unknown_field_suggests_the_closest() {
    assert_bad(
        "unknown_field",
        "name: p\nstages:\n  - id: a\n    kind: command\n    cmd: \"true\"\n    input: {x: b}\n",
        &[],
    );
}

#[test]
fn dangling_reference_names_the_stage_and_suggests() {
    assert_bad(
        "dangling_reference",
        "name: p\nstages:\n  - id: tokenize\n    kind: command\n    cmd: \"true\"\n  - id: train\n    kind: command\n    inputs: {shards: tokenise}\n    cmd: \"true\"\n",
        &[],
    );
}

#[test]
fn cycle_is_printed_as_a_path() {
    assert_bad(
        "cycle",
        "name: p\nstages:\n  - id: a\n    kind: command\n    inputs: {x: c}\n    cmd: \"true\"\n  - id: b\n    kind: command\n    inputs: {x: a}\n    cmd: \"true\"\n  - id: c\n    kind: command\n    inputs: {x: b}\n    cmd: \"true\"\n",
        &[],
    );
}

#[test]
fn wrong_param_type_in_the_file() {
    assert_bad(
        "wrong_param_type",
        "name: p\nparams:\n  steps: {type: int, default: ten}\nstages:\n  - id: a\n    kind: command\n    cmd: \"true\"\n",
        &[],
    );
}

#[test]
fn wrong_param_type_from_the_command_line() {
    assert_bad(
        "wrong_set_type",
        "name: p\nparams:\n  lr: {type: float, default: 3.0e-4}\nstages:\n  - id: a\n    kind: command\n    cmd: \"echo ${params.lr}\"\n",
        &["--set", "lr=fast"],
    );
}

#[test]
fn unknown_param_in_set_and_in_a_reference() {
    assert_bad(
        "unknown_param",
        "name: p\nparams:\n  lr: 0.1\nstages:\n  - id: a\n    kind: command\n    cmd: \"echo ${params.rl}\"\n",
        &["--set", "lrr=1"],
    );
}

#[test]
fn duplicate_id_points_at_both() {
    assert_bad(
        "duplicate_id",
        "name: p\nstages:\n  - id: a\n    kind: command\n    cmd: \"true\"\n  - id: a\n    kind: command\n    cmd: \"false\"\n",
        &[],
    );
}

#[test]
fn yaml_syntax_error_has_a_location() {
    assert_bad(
        "yaml_syntax",
        "name: p\nstages:\n  - id: a\n    kind: [command\n",
        &[],
    );
}

#[test]
fn missing_required_param() {
    assert_bad(
        "missing_cmd",
        "name: p\nstages:\n  - id: a\n    kind: command\n",
        &[],
    );
}

#[test]
fn retries_are_bounded() {
    assert_bad(
        "too_many_retries",
        "name: p\nstages:\n  - id: a\n    kind: command\n    cmd: \"true\"\n    retries: 4294967295\n",
        &[],
    );
}

#[test]
fn a_root_that_is_not_a_directory_is_bad_input() {
    assert_bad(
        "root_nowhere",
        "name: p\nroot: no/such/dir\nstages:\n  - id: a\n    kind: command\n    cmd: \"true\"\n",
        &[],
    );
}

#[test]
fn a_good_pipeline_is_not_an_error() {
    let (code, text) = check(
        "name: p\nstages:\n  - id: a\n    kind: command\n    cmd: \"true\"\n",
        &[],
    );
    assert_eq!(code, Some(0), "{text}");
}

/// Runs `autoscale ARGS` in a fresh workspace holding `pipe.yaml`, and fails the test if it
/// does not exit within `secs` (the inputs here used to hang or eat gigabytes).
fn check_within(yaml: &[u8], args: &[&str], secs: u64) -> (Option<i32>, String) {
    let ws = Workspace::new();
    std::fs::write(ws.path().join("pipe.yaml"), yaml).expect("run autoscale");
    let mut child = ws
        .cmd(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run autoscale");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "`autoscale {}` did not finish within {secs} s",
                args.join(" ")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("run autoscale");
    let text = stderr(&out).replace(&ws.path().display().to_string(), "[WS]");
    assert!(!text.contains("panicked"), "{text}");
    (out.status.code(), text)
}

#[test]
fn a_fan_out_past_the_cap_is_bad_input_not_an_abort() {
    let axis = "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]";
    let yaml = format!(
        "name: p\nstages:\n  - id: grid\n    kind: command\n    matrix: {{a: {axis}, b: {axis}, c: {axis}, d: {axis}, e: {axis}, f: {axis}, g: {axis}, h: {axis}, i: {axis}, j: {axis}}}\n    cmd: \"true\"\n"
    );
    let (code, text) = check_within(yaml.as_bytes(), &["status", "pipe.yaml"], 20);
    assert_eq!(code, Some(2), "{text}");
    insta::assert_snapshot!("fanout_cap", text);
}

#[test]
fn file_inputs_outside_the_root_are_refused_unless_listed_as_external() {
    assert_bad(
        "outside_root",
        "name: p\nstages:\n  - id: a\n    kind: command\n    inputs: {host: \"file:/etc/hostname\"}\n    cmd: \"true\"\n",
        &[],
    );
    let (code, text) = check_within(
        b"name: p\nexternal: [/etc/hostname]\nstages:\n  - id: a\n    kind: command\n    inputs: {host: \"file:/etc/hostname\"}\n    cmd: \"true\"\n",
        &["status", "pipe.yaml"],
        20,
    );
    assert_eq!(
        code,
        Some(0),
        "an input listed under `external:` is read: {text}"
    );
    let (code, text) = check_within(
        b"name: p\nstages:\n  - id: a\n    kind: command\n    inputs: {up: \"file:../../../../../../etc/passwd\"}\n    cmd: \"true\"\n",
        &["status", "pipe.yaml"],
        20,
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("is outside the workspace root"), "{text}");
}

#[test]
fn a_symlink_inside_the_root_counts_by_where_it_points() {
    let ws = Workspace::new();
    std::os::unix::fs::symlink("/etc", ws.path().join("etc-link")).unwrap();
    ws.write(
        "pipe.yaml",
        "name: p\nstages:\n  - id: a\n    kind: command\n    inputs: {x: \"file:etc-link/hostname\"}\n    cmd: \"true\"\n",
    );
    let out = ws.run(&["status", "pipe.yaml"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("is outside the workspace root"), "{text}");
}

#[test]
fn a_device_input_is_refused_at_load_instead_of_hanging() {
    let (code, text) = check_within(
        b"name: p\nexternal: [/dev]\nstages:\n  - id: a\n    kind: command\n    inputs: {z: \"file:/dev/zero\"}\n    cmd: \"true\"\n",
        &["run", "pipe.yaml"],
        20,
    );
    assert_eq!(code, Some(2), "{text}");
    insta::assert_snapshot!("device_input", text);
}

#[test]
fn a_stage_reference_that_escapes_is_refused_at_load() {
    assert_bad(
        "escaping_reference",
        "name: p\nstages:\n  - id: a\n    kind: command\n    cmd: \"true\"\n  - id: b\n    kind: command\n    inputs: {x: a/../../../etc/passwd}\n    cmd: \"true\"\n",
        &[],
    );
}

#[test]
fn a_device_as_pipeline_or_overlay_is_refused_without_reading_it() {
    let (code, text) = check_within(b"", &["status", "/dev/zero"], 20);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("not a regular file"), "{text}");
    let (code, text) = check_within(
        b"name: p\nstages:\n  - id: a\n    kind: command\n    cmd: \"true\"\n",
        &["status", "pipe.yaml", "--with", "/dev/zero"],
        20,
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("overlay file `/dev/zero`"), "{text}");
}

#[test]
fn invalid_utf8_gives_the_line_column_and_byte_offset() {
    let (code, text) = check_within(
        b"name: p\nstages:\n  - id: a\n    kind: command\n    cmd: \"\xff\"\n",
        &["status", "pipe.yaml"],
        20,
    );
    assert_eq!(code, Some(2), "{text}");
    insta::assert_snapshot!("invalid_utf8", text);
}

#[test]
fn the_yaml_librarys_wording_becomes_ours() {
    assert_bad(
        "duplicate_key",
        "name: p\nname: q\nstages:\n  - id: a\n    kind: command\n    cmd: \"true\"\n",
        &[],
    );
    assert_bad(
        "two_documents",
        "name: p\nstages: []\n---\nname: q\nstages: []\n",
        &[],
    );
}
