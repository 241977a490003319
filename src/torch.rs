//! libtorch in the binary (feature `torch`): the `train` and `eval` kinds, `autoscale doctor`,
//! and the hidden `autoscale internal-train JOB.json` that those kinds start as a child process.
//! Without the feature, `doctor` says how to build with it.

use std::path::Path;

use autoscale_engine::KindRegistry;

use crate::exit;
use crate::render::Failure;

/// The built-in kinds, plus `train` and `eval`. Without torch those still check params and
/// plan, so `status` and `dag` work on any pipeline; running one fails with a build hint.
pub fn stage_kinds() -> KindRegistry {
    let mut kinds = autoscale_stages::builtin_kinds();
    match std::env::current_exe() {
        Ok(exe) => {
            for kind in autoscale_train::kinds(autoscale_train::Launcher::Subprocess { exe }) {
                kinds.register(kind);
            }
        }
        Err(e) => tracing::warn!("cannot find the autoscale binary, so no train/eval kinds: {e}"),
    }
    kinds
}

#[cfg(not(feature = "torch"))]
const BUILD_HINT: &str = "install libtorch into .venv and build with the feature: \
python3 -m venv .venv && .venv/bin/pip install torch==2.13.0, then \
PATH=$PWD/.venv/bin:$PATH LIBTORCH_USE_PYTORCH=1 cargo build --release --features torch";

/// `autoscale doctor`: the torch version, the CUDA devices it sees, where libtorch was found.
#[cfg(feature = "torch")]
pub fn doctor(json: bool) -> Result<u8, Failure> {
    let info = autoscale_train::torch_info();
    if json {
        println!("{}", serde_json::to_string(&info).unwrap_or_default());
        return Ok(exit::OK);
    }
    let or_unknown = |s: Option<String>| s.unwrap_or_else(|| "unknown".into());
    println!("torch          {}", or_unknown(info.version.clone()));
    println!(
        "libtorch       {}",
        or_unknown(info.library_dir.as_ref().map(|p| p.display().to_string()))
    );
    println!("linked at      {}", or_unknown(info.linked_dir.clone()));
    println!(
        "libtorch_cuda  {}",
        if info.cuda_library_loaded {
            "loaded"
        } else {
            "not loaded (a CPU-only libtorch)"
        }
    );
    let visible = info
        .cuda_visible_devices
        .as_deref()
        .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v:?})"))
        .unwrap_or_default();
    if info.cuda_available {
        println!(
            "CUDA           {} device(s){visible}, cuDNN {}",
            info.cuda_devices,
            if info.cudnn { "yes" } else { "no" }
        );
    } else if info.cuda_library_loaded {
        println!(
            "CUDA           no devices{visible}: no GPU or no NVIDIA driver here; training runs on the CPU"
        );
    } else {
        println!("CUDA           not built in; training runs on the CPU");
    }
    println!(
        "CPU            {} threads, MKL {}, OpenMP {}",
        info.cpu_threads,
        if info.mkl { "yes" } else { "no" },
        if info.openmp { "yes" } else { "no" }
    );
    Ok(exit::OK)
}

#[cfg(not(feature = "torch"))]
pub fn doctor(json: bool) -> Result<u8, Failure> {
    if json {
        println!(
            "{}",
            serde_json::json!({"torch": null, "built_with_torch": false, "hint": BUILD_HINT})
        );
        return Ok(exit::OK);
    }
    println!("torch          not built in: this autoscale was built without the `torch` feature,");
    println!("               so its `train` and `eval` stages plan but cannot run");
    println!("hint: {BUILD_HINT}");
    Ok(exit::OK)
}

/// `autoscale internal-train JOB.json`: runs one job, writing one JSON message per line on
/// stdout (progress, then the result or the error) and its log on stderr.
#[cfg(feature = "torch")]
pub fn internal_train(job: &Path) -> Result<u8, Failure> {
    use autoscale_train::{ChildMessage, Job, JobHooks};
    use std::io::Write;

    autoscale_train::die_with_parent();
    let say = |m: &ChildMessage| {
        let mut out = std::io::stdout().lock();
        // A closed pipe means the parent is gone; the death signal ends this process.
        let _ = writeln!(out, "{}", serde_json::to_string(m).unwrap_or_default());
        let _ = out.flush();
    };
    let result = Job::read(job).and_then(|job| {
        let cancel = std::sync::atomic::AtomicBool::new(false);
        let progress = |v: serde_json::Value| say(&ChildMessage::Progress(v));
        let log = |line: &str| eprintln!("{line}");
        autoscale_train::run_job(
            &job,
            &JobHooks {
                progress: &progress,
                log: &log,
                cancel: &cancel,
            },
        )
    });
    match result {
        Ok(value) => {
            say(&ChildMessage::Done(value));
            Ok(exit::OK)
        }
        Err(e) => {
            eprintln!("error: {}", e.message());
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            say(&ChildMessage::failure(&e));
            Ok(exit::STAGE_FAILED)
        }
    }
}

/// Without torch: the job fails, with the message the `train`/`eval` stage shows.
#[cfg(not(feature = "torch"))]
pub fn internal_train(_job: &Path) -> Result<u8, Failure> {
    let message = "this autoscale was built without the `torch` feature, so it cannot train";
    let failure = autoscale_train::ChildMessage::Error {
        message: message.into(),
        hint: Some(BUILD_HINT.into()),
    };
    println!("{}", serde_json::to_string(&failure).unwrap_or_default());
    eprintln!("error: {message}\nhint: {BUILD_HINT}");
    Ok(exit::STAGE_FAILED)
}
