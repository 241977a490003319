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
