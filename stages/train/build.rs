//! The `train` and `eval` kinds' implementation (version and libraries) from the committed table
//! `stages/implementations.toml`, and the trainer's code digest: blake3 of the sources the table
//! lists for `train` (this crate's and the libtorch side's in `stages/trainer`), compiled into
//! both `autoscale` and the `autoscale-train` binary, so that the trainer refuses a job from an
//! `autoscale` built from other code.

#[path = "../implementations.rs"]
mod implementations;

use std::path::PathBuf;

fn main() {
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let workspace = here.join("../..");
    implementations::generate(&workspace, &["train", "eval"], &out);
    let table = implementations::read_table(&workspace.join("stages/implementations.toml"));
    let train = &table.kinds["train"];
    for source in &train.sources {
        // A directory: cargo reruns this script when anything under it changes.
        println!(
            "cargo::rerun-if-changed={}",
            workspace.join(source).display()
        );
    }
    println!(
        "cargo::rustc-env=AUTOSCALE_TRAINER_CODE={}",
        implementations::digest(&workspace, train)
    );
}
