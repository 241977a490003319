//! What libtorch this process runs on: for `autoscale doctor`.

use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct TorchInfo {
    /// The torch version (`2.13.0+cu130`), from the wheel's `version.py` or libtorch's
    /// `build-version` next to the loaded library.
    pub version: Option<String>,
    /// The directory the loaded `libtorch_cpu.so` came from.
    pub library_dir: Option<PathBuf>,
    /// The directory the binary was linked against (its rpath).
    pub linked_dir: Option<String>,
    /// Whether `libtorch_cuda.so` is loaded into this process.
    pub cuda_library_loaded: bool,
    pub cuda_available: bool,
    pub cuda_devices: i64,
    pub cudnn: bool,
    /// `CUDA_VISIBLE_DEVICES` as this process sees it.
    pub cuda_visible_devices: Option<String>,
    pub cpu_threads: i32,
    pub mkl: bool,
    pub openmp: bool,
}

/// Asks libtorch what it has and where it was loaded from.
pub fn torch_info() -> TorchInfo {
    let cuda_available = tch::Cuda::is_available();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let loaded = |lib: &str| -> Option<PathBuf> {
        maps.lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| Path::new(p).file_name().is_some_and(|n| n == lib))
            .map(PathBuf::from)
    };
    let cpu_lib = loaded("libtorch_cpu.so");
    let library_dir = cpu_lib
        .as_ref()
        .and_then(|p| p.parent())
        .map(Path::to_path_buf);
    let version = library_dir.as_deref().and_then(crate::torch_version::read);
    TorchInfo {
        version,
        library_dir,
        linked_dir: option_env!("AUTOSCALE_LIBTORCH_LIB").map(str::to_string),
        cuda_library_loaded: loaded("libtorch_cuda.so").is_some(),
        cuda_available,
        cuda_devices: if cuda_available {
            tch::Cuda::device_count()
        } else {
            0
        },
        cudnn: cuda_available && tch::Cuda::cudnn_is_available(),
        cuda_visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        cpu_threads: tch::get_num_threads(),
        mkl: tch::utils::has_mkl(),
        openmp: tch::utils::has_openmp(),
    }
}
