//! The trainer binary seen from `autoscale`: the `train` and `eval` kinds, which start
//! `autoscale-train` for each job, and `autoscale doctor`, which asks it what libtorch it runs
//! on. `autoscale` itself never links libtorch.

use std::path::{Path, PathBuf};

use autoscale_engine::KindRegistry;
use serde_json::Value;

use crate::exit;
use crate::render::Failure;

/// The trainer binary: `$AUTOSCALE_TRAINER`, else `autoscale-train` next to this binary.
fn trainer() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok();
    autoscale_train::find_trainer(exe.as_deref())
}

/// The built-in kinds, plus `train` and `eval`. Those plan and key without the trainer (its
/// identity is compiled in), so `status`, `dag` and remote hits work on any machine; running
/// one without a trainer fails with the build command as the hint.
pub fn stage_kinds() -> KindRegistry {
    let mut kinds = autoscale_stages::builtin_kinds();
    let launcher = autoscale_train::Launcher { worker: trainer() };
    for kind in autoscale_train::kinds(launcher) {
        kinds.register(kind);
    }
    kinds
}

/// `autoscale doctor`: where the trainer is, whether it is the one this `autoscale` expects,
/// and what it reports (the torch version, the CUDA devices it sees, where libtorch was found).
pub fn doctor(json: bool) -> Result<u8, Failure> {
    let expected = autoscale_train::TRAINER_IDENTITY;
    let Some(path) = trainer() else {
        if json {
            println!(
                "{}",
                serde_json::json!({"trainer": null, "expected_identity": expected, "hint": autoscale_train::BUILD_HINT})
            );
        } else {
            println!(
                "trainer        not found: no `{}` next to autoscale and ${} is not set,",
                autoscale_train::TRAINER_BINARY,
                autoscale_train::TRAINER_ENV
            );
            println!("               so `train` and `eval` stages plan but cannot run");
            println!("hint: {}", autoscale_train::BUILD_HINT);
        }
        return Ok(exit::OK);
    };
    let info = ask(&path)?;
    let identity = info.get("identity").and_then(Value::as_str).unwrap_or("");
    if json {
        let mut info = info.clone();
        if let Some(map) = info.as_object_mut() {
            map.insert("trainer".into(), path.display().to_string().into());
            map.insert("expected_identity".into(), expected.into());
        }
        println!("{info}");
    } else {
        print_info(&path, &info);
    }
    if identity != expected {
        return Err(Failure::broken(
            format!(
                "`{}` is `{identity}`, but this autoscale expects `{expected}`",
                path.display()
            ),
            autoscale_train::BUILD_HINT,
        ));
    }
    Ok(exit::OK)
}

/// `autoscale-train doctor`: one JSON object.
fn ask(path: &Path) -> Result<Value, Failure> {
    let output = std::process::Command::new(path)
        .arg("doctor")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            Failure::broken(
                format!("cannot start the trainer `{}`: {e}", path.display()),
                autoscale_train::BUILD_HINT,
            )
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim()).map_err(|_| {
        Failure::broken(
            format!(
                "the trainer `{}` did not answer `doctor` ({}): {}",
                path.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            autoscale_train::BUILD_HINT,
        )
    })
}

fn print_info(path: &Path, info: &Value) {
    let text = |k: &str| {
        info.get(k)
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string()
    };
    let flag = |k: &str| info.get(k).and_then(Value::as_bool).unwrap_or(false);
    let yes = |k: &str| if flag(k) { "yes" } else { "no" };
    println!("trainer        {}", path.display());
    println!("identity       {}", text("identity"));
    println!("torch          {}", text("version"));
    println!("libtorch       {}", text("library_dir"));
    println!("linked at      {}", text("linked_dir"));
    println!(
        "libtorch_cuda  {}",
        if flag("cuda_library_loaded") {
            "loaded"
        } else {
            "not loaded (a CPU-only libtorch)"
        }
    );
    let visible = info
        .get("cuda_visible_devices")
        .and_then(Value::as_str)
        .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v:?})"))
        .unwrap_or_default();
    if flag("cuda_available") {
        println!(
            "CUDA           {} device(s){visible}, cuDNN {}",
            info.get("cuda_devices")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            yes("cudnn")
        );
    } else if flag("cuda_library_loaded") {
        println!(
            "CUDA           no devices{visible}: no GPU or no NVIDIA driver here; training runs on the CPU"
        );
    } else {
        println!("CUDA           not built in; training runs on the CPU");
    }
    println!(
        "CPU            {} threads, MKL {}, OpenMP {}",
        info.get("cpu_threads").and_then(Value::as_i64).unwrap_or(0),
        yes("mkl"),
        yes("openmp")
    );
}
