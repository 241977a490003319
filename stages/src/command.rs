//! The `command` kind: any shell command as a stage, so any trainer can be one.
//!
//! The command runs with `sh -c` in the workspace root and gets, as env variables and as
//! `${...}` templates in `cmd`:
//!
//! | env | template | what |
//! |---|---|---|
//! | `AUTOSCALE_OUT` | `${out}` | the directory to write outputs to; only it is cached |
//! | `AUTOSCALE_INPUT_<NAME>` | `${inputs.name}` | each input's path (a fan-out group: a directory of links, one per member) |
//! | `AUTOSCALE_SCRATCH` | `${scratch}` | scratch space kept across a killed run (checkpoints) |
//! | `AUTOSCALE_PARAM_<NAME>` | | each scalar param |
//! | `AUTOSCALE_PARAMS_JSON` | | every param (lists and maps too) as one JSON object |
//! | `AUTOSCALE_STAGE` | | the stage id |
//! | `CUDA_VISIBLE_DEVICES` | `${devices}` | the devices this stage owns; empty on the CPU |

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use autoscale_engine::{
    Implementation, InputPath, ParamSpec, ParamType, StageContext, StageError, StageKind,
};
use serde_json::{Map, Value, json};

pub struct CommandKind;

const PARAMS: &[ParamSpec] = &[
    ParamSpec::required(
        "cmd",
        ParamType::String,
        "the shell command; it writes its outputs under $AUTOSCALE_OUT",
    ),
    ParamSpec::optional(
        "outputs",
        ParamType::List,
        "paths under $AUTOSCALE_OUT the command must write; checked after it exits",
    ),
];

/// How long a stopped command gets between SIGTERM and SIGKILL.
/// How often a running command checks for cancellation.
const POLL: Duration = Duration::from_millis(50);
const GRACE: Duration = Duration::from_secs(5);

impl StageKind for CommandKind {
    fn name(&self) -> &'static str {
        "command"
    }

    fn implementation(&self) -> Implementation {
        crate::implementations::COMMAND
    }

    fn summary(&self) -> &'static str {
        "runs a shell command with declared inputs and outputs"
    }

    fn params(&self) -> &[ParamSpec] {
        PARAMS
    }

    fn open_params(&self) -> bool {
        true
    }

    fn check(&self, params: &Map<String, Value>) -> Result<(), String> {
        if let Some(Value::Array(outputs)) = params.get("outputs") {
            for o in outputs {
                let Some(path) = o.as_str() else {
                    return Err(format!("`outputs` lists paths, and `{o}` is not a string"));
                };
                let p = Path::new(path);
                if p.is_absolute()
                    || p.components()
                        .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(format!(
                        "output `{path}` must be a relative path inside $AUTOSCALE_OUT, without `..`"
                    ));
                }
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let cmd = ctx
            .params
            .get("cmd")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let staging = ctx.out_dir.parent().unwrap_or(&ctx.out_dir).to_path_buf();
        let inputs = input_env(&staging, ctx.inputs)?;
        let devices = ctx
            .devices
            .as_ref()
            .map(|d| autoscale_engine::Device::visible(d))
            .unwrap_or_default();
        let cmd = template(cmd, ctx, &inputs, &devices);
        let log = fs::File::create(&ctx.log_path)
            .map_err(|e| io_failure("create the log", &ctx.log_path, e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| io_failure("open the log", &ctx.log_path, e))?;
        // A guard shell runs `cmd` so that a killed engine takes all of it down (see
        // `autoscale_engine::process`).
        let mut held = autoscale_engine::process::guarded_shell(&cmd)
            .map_err(|e| StageError::failed(format!("cannot start `sh`: {e}")))?;
        let command = &mut held.command;
        command
            .current_dir(&ctx.work_dir)
            .stdout(log)
            .stderr(log_err)
            .env("AUTOSCALE_OUT", &ctx.out_dir)
            .env("AUTOSCALE_SCRATCH", &ctx.scratch_dir)
            .env("AUTOSCALE_STAGE", ctx.stage_id)
            .env("CUDA_VISIBLE_DEVICES", &devices)
            .env(
                "AUTOSCALE_PARAMS_JSON",
                Value::Object(ctx.params.clone()).to_string(),
            );
        for (name, path) in &inputs {
            command.env(
                format!("AUTOSCALE_INPUT_{}", name.to_ascii_uppercase()),
                path,
            );
        }
        for (name, value) in ctx.params {
            if name == "cmd" || name == "outputs" {
                continue;
            }
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(_) | Value::Bool(_) => value.to_string(),
                _ => continue,
            };
            command.env(format!("AUTOSCALE_PARAM_{}", env_name(name)), text);
        }
        for (k, v) in ctx.env {
            command.env(k, v);
        }
        // Its own process group, so stopping the stage stops everything it started; watched,
        // so that it dies with the engine. Unwatched (dropped) only once the group is gone.
        let (mut child, pgid, _watched) = held.spawn().map_err(|e| StageError::Failed {
            message: format!("cannot start `sh`: {e}"),
            hint: Some("is a POSIX shell installed?".into()),
        })?;
        ctx.started_group(pgid);
        let cancelled = || ctx.cancelled();
        let status = match autoscale_engine::process::wait_or_cancel(&mut child, cancelled, POLL) {
            Ok(Some(status)) => status,
            Ok(None) => {
                autoscale_engine::process::stop_group(pgid, &mut child, GRACE);
                return Err(StageError::Cancelled);
            }
            Err(e) => {
                autoscale_engine::process::stop_group(pgid, &mut child, GRACE);
                return Err(StageError::failed(format!(
                    "lost track of the command: {e}"
                )));
            }
        };
        // Background jobs the command left running could still write into its outputs, or
        // into a retry's: none may live once the outputs are hashed or the stage is retried.
        match autoscale_engine::process::reap_group(pgid, autoscale_engine::process::GROUP_DEADLINE)
        {
            Ok(autoscale_engine::process::Leftovers::None) => {}
            Ok(autoscale_engine::process::Leftovers::Killed) => {
                if let Ok(mut log) = fs::OpenOptions::new().append(true).open(&ctx.log_path) {
                    let _ = writeln!(
                        log,
                        "autoscale: the command exited with processes of its own still running; they were killed before its outputs were stored"
                    );
                }
            }
            Err(e) => {
                return Err(StageError::Failed {
                    message: e,
                    hint: Some(
                        "a process in uninterruptible sleep (a hung mount?); the outputs were not stored".into(),
                    ),
                });
            }
        }
        if !status.success() {
            let how = match status.code() {
                Some(code) => format!("exit status {code}"),
                None => "a signal".to_string(),
            };
            return Err(StageError::Failed {
                message: format!("the command failed with {how}"),
                hint: Some("its log is kept; see below".into()),
            });
        }
        let declared: Vec<&str> = ctx
            .params
            .get("outputs")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let missing: Vec<&str> = declared
            .iter()
            .copied()
            .filter(|o| !ctx.out_dir.join(o).exists())
            .collect();
        if !missing.is_empty() {
            return Err(StageError::Failed {
                message: format!(
                    "the command exited 0 but did not write the declared output(s) {}",
                    missing
                        .iter()
                        .map(|m| format!("`{m}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                hint: Some("write outputs under $AUTOSCALE_OUT (or `${out}` in cmd)".into()),
            });
        }
        Ok(json!({ "outputs": declared }))
    }
}

fn io_failure(what: &str, path: &Path, e: std::io::Error) -> StageError {
    StageError::failed(format!("cannot {what} at `{}`: {e}", path.display()))
}

fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// One path per input; a fan-out group becomes a directory of links named by member id.
fn input_env(
    staging: &Path,
    inputs: &BTreeMap<String, InputPath>,
) -> Result<BTreeMap<String, PathBuf>, StageError> {
    let mut out = BTreeMap::new();
    for (name, input) in inputs {
        let path = match input {
            InputPath::One(p) => p.clone(),
            InputPath::Many(members) => {
                let dir = staging.join("inputs").join(name);
                fs::create_dir_all(&dir)
                    .map_err(|e| io_failure("create the input links", &dir, e))?;
                for (id, target) in members {
                    let link = dir.join(id);
                    std::os::unix::fs::symlink(target, &link)
                        .map_err(|e| io_failure("link an input", &link, e))?;
                }
                dir
            }
        };
        out.insert(name.clone(), path);
    }
    Ok(out)
}

fn template(
    cmd: &str,
    ctx: &StageContext<'_>,
    inputs: &BTreeMap<String, PathBuf>,
    devices: &str,
) -> String {
    let mut out = cmd
        .replace("${out}", &quote(&ctx.out_dir))
        .replace("${scratch}", &quote(&ctx.scratch_dir))
        .replace("${devices}", devices);
    for (name, path) in inputs {
        out = out.replace(&format!("${{inputs.{name}}}"), &quote(path));
    }
    out
}

/// A path as one shell word.
fn quote(path: &Path) -> String {
    let s = path.to_string_lossy();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=,:@%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_env_names() {
        assert_eq!(quote(Path::new("/a/b.txt")), "/a/b.txt");
        assert_eq!(quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
        assert_eq!(env_name("lr-max"), "LR_MAX");
    }

    #[test]
    fn check_rejects_escaping_outputs() {
        let mut params = Map::new();
        params.insert("outputs".into(), json!(["../x"]));
        assert!(CommandKind.check(&params).is_err());
        params.insert("outputs".into(), json!(["sub/x.txt"]));
        assert!(CommandKind.check(&params).is_ok());
    }
}
