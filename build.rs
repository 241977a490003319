//! With the `torch` feature: links the `autoscale` binary so it runs without `LD_LIBRARY_PATH`
//! (an rpath to libtorch's lib dir) and really loads `libtorch_cuda` when the libtorch it links
//! has it (nothing references a libtorch_cuda symbol, so the linker's `--as-needed` would drop
//! it and CUDA would silently be unavailable). Link args must come from the binary's own package:
//! a library's do not propagate.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    // autoscale-train (`links = "autoscale_torch"`) passes on torch-sys's lib dir.
    println!("cargo::rerun-if-env-changed=DEP_AUTOSCALE_TORCH_LIBTORCH_LIB");
    let Some(lib) = std::env::var_os("DEP_AUTOSCALE_TORCH_LIBTORCH_LIB") else {
        println!(
            "cargo::warning=autoscale-train did not say where libtorch is; the binary will need LD_LIBRARY_PATH"
        );
        return;
    };
    let lib = std::path::Path::new(&lib);
    println!("cargo::rustc-link-arg-bins=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo::rustc-link-arg-bins=-Wl,--no-as-needed");
        println!("cargo::rustc-link-arg-bins=-ltorch_cuda");
        println!("cargo::rustc-link-arg-bins=-Wl,--as-needed");
    }
}
