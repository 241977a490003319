//! With the `torch` feature: passes libtorch's lib dir on to the binary's build script (through
//! this package's `links` metadata) and into the crate (for `doctor`), and links this crate's own
//! test binaries so that they run without `LD_LIBRARY_PATH` and really load `libtorch_cuda`.

use std::path::Path;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    // torch-sys (`links = "tch"`) exports the directory it linked against.
    println!("cargo::rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") else {
        println!(
            "cargo::warning=torch-sys did not say where libtorch is; binaries will need LD_LIBRARY_PATH"
        );
        return;
    };
    let lib = Path::new(&lib);
    println!("cargo::metadata=libtorch_lib={}", lib.display());
    println!("cargo::rustc-env=AUTOSCALE_LIBTORCH_LIB={}", lib.display());
    println!("cargo::rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        // Nothing references a libtorch_cuda symbol directly, so `--as-needed` would drop it
        // and CUDA would silently be unavailable.
        println!("cargo::rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo::rustc-link-arg=-ltorch_cuda");
        println!("cargo::rustc-link-arg=-Wl,--as-needed");
    }
}
