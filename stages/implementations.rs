//! The committed implementation table, `stages/implementations.toml`: for each built-in kind,
//! the version its stage keys carry, the libraries whose versions shape its results, and a
//! digest of the sources that compute them.
//!
//! Included with `#[path]` by the build scripts of the crates that define kinds (they turn the
//! table into constants, so a kind cannot be keyed on a number it forgot to bump) and by the
//! test that fails when a digest is stale (`tests/implementations.rs`). No dependencies beyond
//! serde, toml and blake3, which all three already have.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, serde::Deserialize)]
pub struct Table {
    pub kinds: BTreeMap<String, KindEntry>,
}

#[derive(Debug, serde::Deserialize)]
pub struct KindEntry {
    pub version: u32,
    /// Crates (as Cargo.lock names them) whose versions go into the key.
    #[serde(default)]
    pub libraries: Vec<String>,
    /// Files and folders, relative to the workspace root, whose code computes the result.
    pub sources: Vec<String>,
    pub digest: String,
}

pub fn read_table(path: &Path) -> Table {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{} is not a valid table: {e}", path.display()))
}

/// Every package's version in a Cargo.lock.
pub fn lock_versions(lock: &Path) -> BTreeMap<String, String> {
    #[derive(serde::Deserialize)]
    struct Lock {
        package: Vec<Package>,
    }
    #[derive(serde::Deserialize)]
    struct Package {
        name: String,
        version: String,
    }
    let text = std::fs::read_to_string(lock)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", lock.display()));
    let lock: Lock =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{} is unreadable: {e}", lock.display()));
    lock.package
        .into_iter()
        .map(|p| (p.name, p.version))
        .collect()
}

/// `tokenizers 0.22.2, tiktoken-rs 0.12.1`: what a key records of an entry's libraries.
pub fn libraries(entry: &KindEntry, versions: &BTreeMap<String, String>) -> String {
    entry
        .libraries
        .iter()
        .map(|name| {
            let version = versions
                .get(name)
                .unwrap_or_else(|| panic!("library `{name}` is not in Cargo.lock"));
            format!("{name} {version}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes `implementations.rs` into `out_dir`: one constant per kind in `kinds`, named after
/// it in upper case, for the crate's `include!`.
pub fn generate(workspace: &Path, kinds: &[&str], out_dir: &Path) {
    let table_path = workspace.join("stages/implementations.toml");
    let lock_path = workspace.join("Cargo.lock");
    println!("cargo::rerun-if-changed={}", table_path.display());
    println!("cargo::rerun-if-changed={}", lock_path.display());
    let table = read_table(&table_path);
    let versions = lock_versions(&lock_path);
    let mut code = String::from("// Generated from stages/implementations.toml by build.rs.\n");
    for kind in kinds {
        let entry = table
            .kinds
            .get(*kind)
            .unwrap_or_else(|| panic!("stages/implementations.toml has no entry for `{kind}`"));
        let _ = writeln!(
            code,
            "pub const {}: autoscale_engine::Implementation = autoscale_engine::Implementation {{ version: {}, libraries: {:?} }};",
            kind.to_uppercase(),
            entry.version,
            libraries(entry, &versions),
        );
    }
    let target = out_dir.join("implementations.rs");
    std::fs::write(&target, code).unwrap_or_else(|e| panic!("write {}: {e}", target.display()));
}

/// The files an entry's digest covers: its sources, folders walked, sorted by their path
/// relative to the workspace. Test-only files are left out (and [`digest`] leaves out unit
/// test modules), so that a new test is not a change of implementation.
pub fn source_files(workspace: &Path, entry: &KindEntry) -> Vec<(String, PathBuf)> {
    let mut files = Vec::new();
    for source in &entry.sources {
        let path = workspace.join(source);
        assert!(
            path.exists(),
            "stages/implementations.toml names `{source}`, which does not exist"
        );
        collect(&path, &mut files);
    }
    let mut named: Vec<(String, PathBuf)> = files
        .into_iter()
        .filter(|f| {
            !matches!(
                f.file_name().and_then(|n| n.to_str()),
                Some("tests.rs" | "test_support.rs" | "testkit.rs")
            )
        })
        .map(|f| {
            let name = f
                .strip_prefix(workspace)
                .unwrap_or(&f)
                .to_string_lossy()
                .replace('\\', "/");
            (name, f)
        })
        .collect();
    named.sort();
    named.dedup();
    named
}

/// blake3 over each source file's path and bytes, as 16 hex digits.
pub fn digest(workspace: &Path, entry: &KindEntry) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"autoscale-kind-sources\n");
    for (name, path) in source_files(workspace, entry) {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let bytes = without_unit_tests(&bytes);
        hasher.update(name.as_bytes());
        hasher.update(b"\0");
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    hasher.finalize().to_hex()[..16].to_string()
}

/// A source file without its unit tests: everything from a top-level `#[cfg(test)]` followed
/// by `mod tests` on, the convention every file of the workspace follows (tests last).
fn without_unit_tests(bytes: &[u8]) -> &[u8] {
    const MARK: &[u8] = b"\n#[cfg(test)]\nmod tests";
    bytes
        .windows(MARK.len())
        .position(|w| w == MARK)
        .map_or(bytes, |at| &bytes[..at])
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
            if p.file_name().is_some_and(|n| n == "tests") {
                continue;
            }
            collect(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}
