//! Keys name the code that made a result, and only that code: a kind whose implementation
//! changed reruns (and `status` says why), while its neighbours, which an edit of another kind
//! or of the engine does not touch, stay cached.

use std::path::Path;
use std::sync::Arc;

use autoscale_cache::Cache;
use autoscale_engine::{
    DeviceClass, Engine, GpuSpec, Implementation, KindRegistry, Overrides, ParamSpec, ParamType,
    RunOptions, StageContext, StageError, StageKind, StageState,
};
use serde_json::Value;

/// A kind whose implementation version the test chooses; writes its `text` param.
struct Echo {
    version: u32,
}

const ECHO_PARAMS: &[ParamSpec] = &[ParamSpec::required(
    "text",
    ParamType::String,
    "what to write",
)];

impl StageKind for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }
    fn implementation(&self) -> Implementation {
        Implementation {
            version: self.version,
            libraries: "",
        }
    }
    fn summary(&self) -> &'static str {
        "writes its text"
    }
    fn params(&self) -> &[ParamSpec] {
        ECHO_PARAMS
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let text = ctx.params["text"].as_str().unwrap_or_default();
        std::fs::write(ctx.out_dir.join("text.txt"), text)
            .map_err(|e| StageError::failed(e.to_string()))?;
        Ok(Value::Null)
    }
}

/// `echo` whose results depend on the device class, as `train`'s do.
struct DeviceEcho;

impl StageKind for DeviceEcho {
    fn name(&self) -> &'static str {
        "device_echo"
    }
    fn implementation(&self) -> Implementation {
        Implementation {
            version: 1,
            libraries: "",
        }
    }
    fn device_identity(&self, class: DeviceClass) -> Option<&'static str> {
        Some(match class {
            DeviceClass::Cpu => "cpu fp32",
            DeviceClass::Cuda => "cuda bf16-matmul",
        })
    }
    fn summary(&self) -> &'static str {
        "writes its text, on whatever device"
    }
    fn params(&self) -> &[ParamSpec] {
        ECHO_PARAMS
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let text = ctx.params["text"].as_str().unwrap_or_default();
        let on = if ctx.devices.is_some() { "cuda" } else { "cpu" };
        std::fs::write(ctx.out_dir.join("text.txt"), format!("{text} on {on}"))
            .map_err(|e| StageError::failed(e.to_string()))?;
        Ok(Value::Null)
    }
}

fn engine(cache: &Path, echo_version: u32) -> Engine {
    let mut kinds: KindRegistry = autoscale_stages::builtin_kinds();
    kinds.register(Arc::new(Echo {
        version: echo_version,
    }));
    kinds.register(Arc::new(DeviceEcho));
    Engine::new(Cache::open(cache).expect("open cache"), kinds)
}

const PIPELINE: &str = r#"
name: keys
stages:
  - id: words
    kind: echo
    params: {text: "hello"}
  - id: shout
    kind: command
    inputs: {words: words}
    cmd: "tr a-z A-Z < $AUTOSCALE_INPUT_WORDS/text.txt > $AUTOSCALE_OUT/loud.txt"
  - id: other
    kind: command
    cmd: "echo other > $AUTOSCALE_OUT/o.txt"
"#;

fn states(engine: &Engine, file: &Path) -> Vec<(String, StageState)> {
    let pipeline = engine.load(file, &Overrides::default()).expect("load");
    engine
        .status(&pipeline)
        .expect("status")
        .into_iter()
        .map(|s| (s.stage, s.state))
        .collect()
}

fn run(engine: &Engine, file: &Path) -> autoscale_engine::RunSummary {
    let pipeline = engine.load(file, &Overrides::default()).expect("load");
    engine
        .run(&pipeline, &RunOptions::default(), &|_| {})
        .expect("run")
}

#[test]
fn a_new_kind_version_reruns_its_stages_only_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, PIPELINE).expect("write");
    let cache = dir.path().join("cache");
    let first = run(&engine(&cache, 1), &file);
    assert_eq!((first.executed, first.cached), (3, 0));

    // The same code: everything is cached.
    let same = engine(&cache, 1);
    assert!(
        states(&same, &file)
            .iter()
            .all(|(_, s)| matches!(s, StageState::Cached { .. })),
        "{:?}",
        states(&same, &file)
    );

    // A new implementation of `echo`: its stage reruns, and status says why.
    let bumped = engine(&cache, 2);
    let before = states(&bumped, &file);
    let words = &before
        .iter()
        .find(|(id, _)| id == "words")
        .expect("words")
        .1;
    match words {
        StageState::WillRun { reasons, .. } => assert!(
            reasons
                .iter()
                .any(|r| r == "implementation of `echo` changed: version 1 -> 2"),
            "{reasons:?}"
        ),
        other => panic!("words should rerun, is {other:?}"),
    }
    let other = &before
        .iter()
        .find(|(id, _)| id == "other")
        .expect("other")
        .1;
    assert!(matches!(other, StageState::Cached { .. }), "{other:?}");
    // Its dependent keys on the bytes it makes, which are the same: cached once it reran.
    let second = run(&bumped, &file);
    assert_eq!((second.executed, second.cached), (1, 2), "{second:?}");
}

const DEVICE_PIPELINE: &str = r#"
name: devices
stages:
  - id: trained
    kind: device_echo
    params: {text: "weights"}
    resources: {gpus: 1}
  - id: small
    kind: device_echo
    params: {text: "no GPU asked"}
  - id: tool
    kind: command
    cmd: "echo tool > $AUTOSCALE_OUT/t.txt"
    resources: {gpus: 1}
"#;

fn state_of<'a>(states: &'a [(String, StageState)], id: &str) -> &'a StageState {
    &states.iter().find(|(s, _)| s == id).expect("a stage").1
}

/// A result made on the CPU (here: a GPU request with no GPU, the CPU fallback) is never served
/// for a run that has GPUs, or the other way round, for kinds whose results depend on the
/// device; kinds whose results do not (`command`), and stages that ask for no GPU, stay cached.
#[test]
fn a_cpu_fallback_result_is_not_served_to_a_run_with_gpus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, DEVICE_PIPELINE).expect("write");
    let cache = dir.path().join("cache");
    let cpu = engine(&cache, 1);
    let pipeline = cpu.load(&file, &Overrides::default()).expect("load");
    let options = RunOptions {
        gpus: GpuSpec::None,
        ..RunOptions::default()
    };
    let first = cpu.run(&pipeline, &options, &|_| {}).expect("run");
    assert_eq!((first.executed, first.cached), (3, 0));
    assert_eq!(cpu.gpus_asked(), Some(false), "a key depended on the GPUs");

    // The same machine, still without GPUs: all cached.
    let again = engine(&cache, 1);
    again.set_gpus(false);
    assert!(
        states(&again, &file)
            .iter()
            .all(|(_, s)| matches!(s, StageState::Cached { .. }))
    );

    // With GPUs: the device-dependent stage that asks for one reruns, and says why.
    let gpu = engine(&cache, 1);
    gpu.set_gpus(true);
    let now = states(&gpu, &file);
    match state_of(&now, "trained") {
        StageState::WillRun { reasons, .. } => assert!(
            reasons
                .iter()
                .any(|r| r == "device changed: cpu fp32 -> cuda bf16-matmul"),
            "{reasons:?}"
        ),
        other => panic!("`trained` should rerun, is {other:?}"),
    }
    assert!(matches!(state_of(&now, "small"), StageState::Cached { .. }));
    assert!(matches!(state_of(&now, "tool"), StageState::Cached { .. }));
}
