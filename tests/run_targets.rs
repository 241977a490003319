//! `autoscale run FILE STAGE...` and `status FILE STAGE...`: only the named stages and what they
//! need. A fanned-out stage's id names all of its children; an unknown name is bad input.

mod common;

use common::{Workspace, stderr, stdout, with_outcome};

const PIPELINE: &str = r#"
name: targets
stages:
  - id: download
    kind: command
    cmd: "echo raw > $AUTOSCALE_OUT/raw.txt"
  - id: shard
    kind: command
    foreach: [a, b]
    params: {part: "${item}"}
    inputs: {raw: download}
    cmd: "echo $AUTOSCALE_PARAM_PART > $AUTOSCALE_OUT/shard.txt"
  - id: train
    kind: command
    inputs: {shards: shard}
    cmd: "cat $AUTOSCALE_INPUT_SHARDS/*/shard.txt > $AUTOSCALE_OUT/model.txt"
  - id: unrelated
    kind: command
    cmd: "echo x > $AUTOSCALE_OUT/x.txt"
"#;

#[test]
fn a_target_runs_itself_and_its_upstream_only() {
    let ws = Workspace::new();
    ws.write("p.yaml", PIPELINE);
    // A fanned-out stage's id names both of its children.
    let (code, events) = ws.run_json(&["p.yaml", "shard"]);
    assert_eq!(code, 0, "{events:?}");
    assert_eq!(
        with_outcome(&events, "executed"),
        ["download", "shard[a]", "shard[b]"]
    );
    assert!(
        !events
            .iter()
            .any(|e| e["stage"] == "train" || e["stage"] == "unrelated"),
        "{events:?}"
    );
    // One child by its own id.
    let status = ws.run(&["--json", "status", "p.yaml", "shard[a]"]);
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let listed = stdout(&status);
    assert!(
        listed.contains("shard[a]") && listed.contains("download"),
        "{listed}"
    );
    assert!(
        !listed.contains("shard[b]") && !listed.contains("unrelated"),
        "{listed}"
    );
    // Status of a target shows what it needs; the targeted run left the others' refs alone.
    let status = ws.run(&["status", "p.yaml", "train"]);
    let text = stdout(&status);
    assert!(text.contains("train"), "{text}");
    assert!(!text.contains("unrelated"), "{text}");
    let (code, events) = ws.run_json(&["p.yaml", "train", "unrelated"]);
    assert_eq!(code, 0, "{events:?}");
    assert_eq!(with_outcome(&events, "executed"), ["train", "unrelated"]);
    assert_eq!(
        with_outcome(&events, "cached"),
        ["download", "shard[a]", "shard[b]"]
    );
    let (_, events) = ws.run_json(&["p.yaml"]);
    assert!(with_outcome(&events, "executed").is_empty(), "{events:?}");
}

#[test]
fn an_unknown_target_is_bad_input_with_a_suggestion() {
    let ws = Workspace::new();
    ws.write("p.yaml", PIPELINE);
    for command in ["run", "status"] {
        let out = ws.run(&[command, "p.yaml", "shrad"]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("no stage `shrad`"), "{err}");
        assert!(err.contains("did you mean `shard`?"), "{err}");
    }
    // Nothing close: the stages are listed, each fan-out once.
    let out = ws.run(&["run", "p.yaml", "zzz"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("known stages: `download`, `shard`, `train`, `unrelated`"),
        "{err}"
    );
    // Nothing ran.
    assert!(!ws.cache().join("v1/refs/pipeline-targets.json").exists());
}
