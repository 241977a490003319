//! The version of a libtorch, from the files beside its lib dir. Shared by the build script
//! (the version linked, part of the trainer's identity) and `doctor` (the version loaded).

use std::path::Path;

/// `torch/lib/../version.py` (a wheel) or `libtorch/lib/../build-version` (a libtorch zip).
pub fn read(lib_dir: &Path) -> Option<String> {
    let root = lib_dir.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("__version__") {
                let v = rest.trim_start_matches([' ', '=', ':']).trim();
                let v = v.rsplit('=').next().unwrap_or(v).trim();
                return Some(v.trim_matches(['\'', '"']).to_string());
            }
        }
    }
    std::fs::read_to_string(root.join("build-version"))
        .ok()
        .map(|s| s.trim().to_string())
}
