//! The `autoscale` binary never links libtorch: training runs in the separate `autoscale-train`
//! worker, so every command starts without loading it.

use std::path::Path;

use object::elf;
use object::read::elf::ElfFile64;

/// The shared libraries a binary's dynamic section asks for (`DT_NEEDED`).
fn needed(binary: &Path) -> Vec<String> {
    let data = std::fs::read(binary).expect("read the binary");
    let file = ElfFile64::<object::Endianness>::parse(&*data).expect("an ELF file");
    let endian = file.endian();
    let table = file
        .elf_section_table()
        .dynamic_table(endian, &*data)
        .expect("a dynamic section");
    table
        .iter()
        .filter(|d| d.tag == elf::DT_NEEDED)
        .map(|d| String::from_utf8_lossy(table.string(d).expect("a name")).into_owned())
        .collect()
}

#[test]
fn the_autoscale_binary_links_no_libtorch() {
    let libs = needed(Path::new(env!("CARGO_BIN_EXE_autoscale")));
    assert!(libs.iter().any(|l| l.starts_with("libc.so")), "{libs:?}");
    let torch: Vec<&String> = libs
        .iter()
        .filter(|l| l.contains("torch") || l.starts_with("libc10"))
        .collect();
    assert!(torch.is_empty(), "autoscale links {torch:?}");
}

#[test]
fn the_trainer_links_libtorch_and_libtorch_cuda_where_it_exists() {
    let trainer = Path::new(env!("CARGO_BIN_EXE_autoscale")).with_file_name("autoscale-train");
    if !trainer.is_file() {
        assert!(
            std::env::var_os("AUTOSCALE_REQUIRE_TRAINER").is_none(),
            "no trainer at {}",
            trainer.display()
        );
        return;
    }
    let libs = needed(&trainer);
    assert!(libs.iter().any(|l| l == "libtorch_cpu.so"), "{libs:?}");
    let out = std::process::Command::new(&trainer)
        .arg("doctor")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run the trainer");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor's JSON");
    let lib = Path::new(info["library_dir"].as_str().unwrap_or_default());
    // The linker's --as-needed would drop libtorch_cuda (nothing references its symbols), and
    // CUDA would silently be unavailable.
    assert_eq!(
        libs.iter().any(|l| l == "libtorch_cuda.so"),
        lib.join("libtorch_cuda.so").is_file(),
        "{libs:?}"
    );
}
