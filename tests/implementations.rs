//! The committed implementation table (`stages/implementations.toml`) is kept honest: a kind's
//! sources cannot change while the table still carries their old digest, every built-in kind has
//! an entry, and the version a kind keys on is the table's.

#[path = "../stages/implementations.rs"]
mod implementations;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn table_path() -> PathBuf {
    workspace().join("stages/implementations.toml")
}

/// Sets `digest` in the `[kinds.<kind>]` section of the table's text, leaving the rest (and
/// every comment) as it is.
fn with_digest(text: &str, kind: &str, digest: &str) -> String {
    let header = format!("[kinds.{kind}]");
    let mut in_section = false;
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with('[') {
            in_section = line.trim() == header;
        }
        if in_section && line.starts_with("digest") {
            out.push_str(&format!("digest = \"{digest}\""));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[test]
fn every_kinds_sources_match_the_digest_the_table_carries() {
    let root = workspace();
    let table = implementations::read_table(&table_path());
    let mut stale = Vec::new();
    for (kind, entry) in &table.kinds {
        let now = implementations::digest(&root, entry);
        if now != entry.digest {
            stale.push((kind.clone(), entry.digest.clone(), now, entry));
        }
    }
    if stale.is_empty() {
        return;
    }
    if std::env::var_os("AUTOSCALE_ACCEPT_IMPLEMENTATIONS").is_some() {
        let mut text = std::fs::read_to_string(table_path()).expect("read the table");
        for (kind, _, now, _) in &stale {
            text = with_digest(&text, kind, now);
        }
        std::fs::write(table_path(), text).expect("write the table");
        eprintln!(
            "rewrote the digests of: {}",
            stale
                .iter()
                .map(|s| s.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return;
    }
    let mut message = String::from(
        "the code of these kinds changed since stages/implementations.toml was updated:\n",
    );
    for (kind, old, now, entry) in &stale {
        message.push_str(&format!(
            "  {kind} (version {}): digest {old} -> {now}; sources: {}\n",
            entry.version,
            entry.sources.join(", ")
        ));
    }
    message.push_str(
        "decide for each: bump `version` if its outputs for the same inputs may change (every \
         cached result of the kind is then recomputed), keep it if they cannot (a comment, a \
         rename, a refactor); say which in the commit. Then rewrite the digests with \
         AUTOSCALE_ACCEPT_IMPLEMENTATIONS=1 cargo test --test implementations",
    );
    panic!("{message}");
}

#[test]
fn every_built_in_kind_has_an_entry_and_keys_on_its_version() {
    let table = implementations::read_table(&table_path());
    let mut kinds = autoscale_stages::builtin_kinds();
    for kind in autoscale_train::kinds(autoscale_train::Launcher { worker: None }) {
        kinds.register(kind);
    }
    let names: BTreeSet<&str> = kinds.names().collect();
    let entries: BTreeSet<&str> = table.kinds.keys().map(String::as_str).collect();
    assert_eq!(names, entries, "built-in kinds vs the table's entries");
    for name in names {
        let kind = kinds.get(name).expect("registered");
        assert_eq!(
            kind.implementation().version,
            table.kinds[name].version,
            "`{name}` keys on a version the table does not carry (a stale build?)"
        );
    }
    let train = kinds.get("train").expect("registered").implementation();
    assert!(
        train
            .libraries
            .contains(&format!("libtorch {}", autoscale_train::LIBTORCH_VERSION)),
        "train keys name the libtorch: {}",
        train.libraries
    );
    let tokenizer = kinds.get("tokenizer").expect("registered").implementation();
    assert!(
        tokenizer.libraries.contains("tokenizers 0."),
        "{}",
        tokenizer.libraries
    );
}

#[test]
fn the_digest_follows_a_kinds_sources_and_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let write = |rel: &str, text: &str| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    };
    write("kind/src/lib.rs", "fn a() {}");
    write("kind/src/tests.rs", "#[test] fn t() {}");
    write("kind/tests/it.rs", "#[test] fn t() {}");
    write("other/lib.rs", "fn b() {}");
    let table: implementations::Table = toml::from_str(
        r#"
        [kinds.k]
        version = 1
        sources = ["kind"]
        digest = ""
        "#,
    )
    .expect("parse");
    let entry = &table.kinds["k"];
    let digest = |root: &Path| implementations::digest(root, entry);
    let first = digest(root);
    write("other/lib.rs", "fn b() { changed }");
    write("kind/src/tests.rs", "#[test] fn t() { changed }");
    write("kind/tests/it.rs", "#[test] fn t() { changed }");
    assert_eq!(
        digest(root),
        first,
        "another crate's code and tests are not the kind's"
    );
    write(
        "kind/src/lib.rs",
        "fn a() {}\n#[cfg(test)]\nmod tests {\n    #[test]\n    fn t() {}\n}\n",
    );
    assert_eq!(digest(root), first, "nor are its unit tests");
    write("kind/src/lib.rs", "fn a() { changed }");
    assert_ne!(digest(root), first, "the kind's own code is");
    let text = "[kinds.a]\nversion = 1\ndigest = \"x\"\n\n[kinds.b]\ndigest = \"y\"\n";
    assert_eq!(
        with_digest(text, "b", "z"),
        "[kinds.a]\nversion = 1\ndigest = \"x\"\n\n[kinds.b]\ndigest = \"z\"\n"
    );
}
