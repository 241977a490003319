//! A kind run outside the engine for unit tests, with every directory under one temp dir:
//! each run gets `out/<id>` and `scratch/<id>`, so later runs can read earlier outputs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use autoscale_engine::{InputPath, StageContext, StageError, StageKind};
use serde_json::Value;

pub(crate) struct Harness {
    pub root: tempfile::TempDir,
}

impl Harness {
    pub fn new() -> Self {
        Self {
            root: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// `root/name`, created.
    pub fn dir(&self, name: &str) -> PathBuf {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).expect("create dir");
        dir
    }

    /// Checks and runs `kind` as stage `id`; its output directory and result.
    pub fn run(
        &self,
        kind: &dyn StageKind,
        id: &str,
        params: Value,
        inputs: BTreeMap<String, InputPath>,
    ) -> Result<(PathBuf, Value), StageError> {
        let Value::Object(params) = params else {
            panic!("params must be a map")
        };
        let out_dir = self.dir(&format!("out/{id}"));
        let cancel = AtomicBool::new(false);
        let env = BTreeMap::new();
        let ctx = StageContext {
            stage_id: id,
            params: &params,
            inputs: &inputs,
            out_dir: out_dir.clone(),
            scratch_dir: self.dir(&format!("scratch/{id}")),
            work_dir: self.root.path().to_owned(),
            log_path: self.root.path().join(format!("{id}.log")),
            devices: None,
            env: &env,
            cancel: &cancel,
            progress: &|_| {},
            on_group: &|_| {},
        };
        kind.check(&params).map_err(StageError::failed)?;
        kind.run(&ctx).map(|summary| (out_dir, summary))
    }
}
