//! Links the `autoscale-train` binary (and this crate's tests) so that they run without
//! `LD_LIBRARY_PATH` (an rpath to the lib dir torch-sys linked) and really load `libtorch_cuda`
//! when that libtorch has it (nothing references a libtorch_cuda symbol, so the linker's
//! `--as-needed` would drop it and CUDA would silently be unavailable). Also records the linked
//! libtorch's version, which is part of the trainer's identity.

use std::path::Path;

#[path = "src/torch_version.rs"]
mod torch_version;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/torch_version.rs");
    // torch-sys (`links = "tch"`) exports the directory it linked against.
    println!("cargo::rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") else {
        println!(
            "cargo::warning=torch-sys did not say where libtorch is; autoscale-train will need LD_LIBRARY_PATH"
        );
        return;
    };
    let lib = Path::new(&lib);
    println!("cargo::rustc-env=AUTOSCALE_LIBTORCH_LIB={}", lib.display());
    println!("cargo::rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo::rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo::rustc-link-arg=-ltorch_cuda");
        println!("cargo::rustc-link-arg=-Wl,--as-needed");
    }
    if let Some(version) = torch_version::read(lib) {
        println!("cargo::rustc-env=AUTOSCALE_LINKED_LIBTORCH={version}");
    }
    for file in ["../version.py", "../build-version"] {
        println!("cargo::rerun-if-changed={}", lib.join(file).display());
    }
}
