//! Each built-in kind's implementation (version and libraries) as a constant, from the committed
//! table `stages/implementations.toml` (see there and `implementations.rs`).

#[path = "implementations.rs"]
mod implementations;

use std::path::PathBuf;

fn main() {
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    implementations::generate(
        &here.join(".."),
        &[
            "command",
            "download",
            "prepare",
            "tokenizer",
            "shard",
            "ddo_plan",
            "ddo",
            "predict",
            "mixture",
            "report",
        ],
        &out,
    );
}
