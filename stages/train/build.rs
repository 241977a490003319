//! The trainer's identity: a blake3 digest of the code that makes a training's result (this
//! crate's sources and the libtorch side's in `stages/trainer`), compiled into both `autoscale`
//! and the `autoscale-train` binary. `autoscale` keys train/eval stages on it without starting the
//! trainer (which would load libtorch), and the trainer refuses a job from an `autoscale` built
//! from other code.

use std::path::{Path, PathBuf};

fn main() {
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let roots = [
        here.join("Cargo.toml"),
        here.join("src"),
        here.join("../trainer/Cargo.toml"),
        here.join("../trainer/build.rs"),
        here.join("../trainer/src"),
    ];
    let mut files = Vec::new();
    for root in &roots {
        // A directory: cargo reruns this script when anything under it changes.
        println!("cargo::rerun-if-changed={}", root.display());
        collect(root, &mut files);
    }
    let base = here.join("..");
    let mut named: Vec<(String, PathBuf)> = files
        .into_iter()
        .map(|f| {
            let name = f
                .strip_prefix(&base)
                .unwrap_or(&f)
                .to_string_lossy()
                .replace('\\', "/");
            (name, f)
        })
        .collect();
    named.sort();
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"autoscale-trainer-code\n");
    for (name, path) in &named {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        hasher.update(name.as_bytes());
        hasher.update(b"\0");
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    let hex = hasher.finalize().to_hex();
    println!("cargo::rustc-env=AUTOSCALE_TRAINER_CODE={}", &hex[..16]);
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_file() {
        out.push(path.to_path_buf());
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs" || e == "toml") {
            out.push(p);
        }
    }
}
