//! The remote protocol against a directory remote: hits, verification, refusals, outages and
//! races. The same paths against S3 run in the workspace's `tests/remote_cache.rs`.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::StageTimings;

fn key(n: u8) -> ActionKey {
    ActionKey::from(blake3::hash(&[n]))
}

fn remote_at(dir: &Path, mode: RemoteMode) -> Remote {
    Remote::at(
        RemoteLocation::Directory(dir.to_path_buf()),
        mode,
        Duration::from_secs(5),
    )
    .unwrap()
}

/// Commits one action with the given files (path, contents) and log.
fn commit(cache: &Cache, n: u8, files: &[(&str, &[u8])], log: &[u8]) -> Manifest {
    let lock = cache.lock(&key(n), "t").unwrap();
    let staging = cache.staging(&lock).unwrap();
    for (path, bytes) in files {
        let p = staging.join("out").join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }
    let pending = cache
        .ingest(
            lock,
            log,
            serde_json::json!({"n": n}),
            serde_json::json!({"stage": format!("s{n}")}),
            StageTimings::default(),
        )
        .unwrap();
    cache.commit(vec![pending]).unwrap().remove(0)
}

struct Team {
    _dirs: tempfile::TempDir,
    remote_dir: std::path::PathBuf,
    a: Cache,
    b: Cache,
}

fn team(mode_b: RemoteMode) -> Team {
    let dirs = tempfile::tempdir().unwrap();
    let remote_dir = dirs.path().join("remote");
    fs::create_dir(&remote_dir).unwrap();
    let a = Cache::open(dirs.path().join("a"))
        .unwrap()
        .with_remote(remote_at(&remote_dir, RemoteMode::ReadWrite));
    let b = Cache::open(dirs.path().join("b"))
        .unwrap()
        .with_remote(remote_at(&remote_dir, mode_b));
    Team {
        _dirs: dirs,
        remote_dir,
        a,
        b,
    }
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn remote_blob(t: &Team, digest: &ArtifactDigest) -> std::path::PathBuf {
    let raw = t.remote_dir.join(Remote::blob_name(digest, false));
    if raw.exists() {
        raw
    } else {
        t.remote_dir.join(Remote::blob_name(digest, true))
    }
}

fn overwrite(path: &Path, bytes: &[u8]) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(path, bytes).unwrap();
}

#[test]
fn a_commit_uploads_and_another_member_downloads_a_verified_copy() {
    let t = team(RemoteMode::ReadWrite);
    let log = "step 1 loss 3.2\n".repeat(500);
    let text = "a compressible line of a shard\n".repeat(2000);
    let m = commit(
        &t.a,
        1,
        &[("shard.txt", text.as_bytes()), ("sub/w.bin", b"\x00\x01")],
        log.as_bytes(),
    );
    assert!(t.a.take_remote_warnings().is_empty());
    let entry = t.remote_dir.join(Remote::action_name(&m.key));
    assert!(entry.exists(), "the entry is uploaded");
    let shard = m.files.iter().find(|f| f.path == "shard.txt").unwrap();
    assert!(
        t.remote_dir
            .join(Remote::blob_name(&shard.digest, true))
            .exists(),
        "a compressible blob is stored zstd-compressed"
    );

    let (found, source) = t.b.find(&m.key).unwrap().unwrap();
    assert_eq!(source, HitSource::Remote);
    assert_eq!(found.tree, m.tree);
    assert!(
        t.b.lookup_local(&m.key).unwrap().is_none(),
        "find downloads nothing"
    );
    let got = t.b.lookup(&m.key).unwrap().unwrap();
    assert_eq!(got.tree, m.tree);
    assert_eq!(t.b.find(&m.key).unwrap().unwrap().1, HitSource::Local);
    let out = t.b.materialize(&got).unwrap();
    assert_eq!(fs::read(out.join("shard.txt")).unwrap(), text.as_bytes());
    assert_eq!(fs::read(out.join("sub/w.bin")).unwrap(), b"\x00\x01");
    assert_eq!(t.b.read_blob(&got.log.unwrap()).unwrap(), log.as_bytes());
    assert!(t.b.verify().unwrap().problems.is_empty());
    assert!(t.b.take_remote_warnings().is_empty());
    let stats = t.b.remote().unwrap().stats();
    assert_eq!(stats.blobs_downloaded, 3);
}

#[test]
fn a_tampered_blob_is_detected_and_nothing_lands_locally() {
    let t = team(RemoteMode::ReadWrite);
    let m = commit(
        &t.a,
        1,
        &[("a.txt", b"good bytes"), ("b.txt", b"fine")],
        b"",
    );
    let a_txt = m.files.iter().find(|f| f.path == "a.txt").unwrap();
    overwrite(&remote_blob(&t, &a_txt.digest), b"evil bytes");
    assert!(t.b.lookup(&m.key).unwrap().is_none());
    let warnings = t.b.take_remote_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].message.contains("corrupt"), "{warnings:?}");
    assert_eq!(warnings[0].key, Some(m.key));
    assert!(t.b.lookup_local(&m.key).unwrap().is_none());
    assert!(
        files_under(&t.b.root().join("v1/blobs")).is_empty(),
        "not even the good blob of a bad entry is kept"
    );
    assert!(files_under(&t.b.root().join("v1/tmp")).is_empty());
    // A wrong size with the right hash prefix is caught too.
    overwrite(&remote_blob(&t, &a_txt.digest), b"good bytes and more");
    let fresh = Cache::open(t.b.root().join("../c"))
        .unwrap()
        .with_remote(remote_at(&t.remote_dir, RemoteMode::ReadOnly));
    assert!(fresh.lookup(&m.key).unwrap().is_none());
    let warnings = fresh.take_remote_warnings();
    assert!(warnings[0].message.contains("larger than"), "{warnings:?}");
}

#[test]
fn blobs_without_an_entry_are_a_miss_and_an_entry_without_blobs_is_refused() {
    let t = team(RemoteMode::ReadWrite);
    let plain = Cache::open(t.a.root().join("../plain")).unwrap();
    let m = commit(&plain, 1, &[("x", b"x")], b"");
    // An upload killed between its blobs and its entry.
    let remote = remote_at(&t.remote_dir, RemoteMode::ReadWrite);
    remote.upload_blobs(&plain, &m).unwrap();
    assert!(t.b.find(&m.key).unwrap().is_none());
    assert!(t.b.lookup(&m.key).unwrap().is_none());
    assert!(t.b.take_remote_warnings().is_empty(), "a plain miss");
    // The reverse, which the protocol never writes: an entry whose blob is gone.
    let m2 = commit(&t.a, 2, &[("y", b"y")], b"");
    fs::remove_file(remote_blob(&t, &m2.files[0].digest)).unwrap();
    assert!(t.b.lookup(&m2.key).unwrap().is_none());
    let warnings = t.b.take_remote_warnings();
    assert!(warnings[0].message.contains("missing"), "{warnings:?}");
    assert!(t.b.lookup_local(&m2.key).unwrap().is_none());
}

#[test]
fn untrusted_entries_are_refused() {
    let t = team(RemoteMode::ReadWrite);
    let m = commit(&t.a, 1, &[("f.txt", b"f")], b"");
    let entry_path = t.remote_dir.join(Remote::action_name(&m.key));
    let original: serde_json::Value =
        serde_json::from_slice(&fs::read(&entry_path).unwrap()).unwrap();
    type Tamper = fn(&mut serde_json::Value);
    let cases: [(&str, Tamper); 8] = [
        ("not a plain relative path", |v| {
            v["manifest"]["files"][0]["path"] = "../../etc/passwd".into()
        }),
        ("not a plain relative path", |v| {
            v["manifest"]["files"][0]["path"] = "/etc/passwd".into()
        }),
        ("schema version 7", |v| v["manifest"]["schema"] = 7.into()),
        ("format is 9", |v| v["format"] = 9.into()),
        ("more than the limit", |v| {
            v["manifest"]["files"][0]["size"] = (1u64 << 60).into()
        }),
        ("names key", |v| {
            v["manifest"]["key"] = key(99).to_hex().into()
        }),
        ("tree digest", |v| {
            v["manifest"]["files"][0]["executable"] = true.into()
        }),
        ("not a valid manifest", |v| *v = "[1, 2".into()),
    ];
    for (expected, tamper) in cases {
        let mut v = original.clone();
        tamper(&mut v);
        let bytes = match &v {
            serde_json::Value::String(s) => s.clone().into_bytes(),
            other => serde_json::to_vec(other).unwrap(),
        };
        overwrite(&entry_path, &bytes);
        let fresh_dir = tempfile::tempdir().unwrap();
        let b = Cache::open(fresh_dir.path())
            .unwrap()
            .with_remote(remote_at(&t.remote_dir, RemoteMode::ReadOnly));
        assert!(b.find(&m.key).unwrap().is_none(), "{expected}");
        assert!(b.lookup(&m.key).unwrap().is_none(), "{expected}");
        let warnings = b.take_remote_warnings();
        assert_eq!(warnings.len(), 1, "{expected}: {warnings:?}");
        assert!(
            error_text(&warnings[0]).contains(expected),
            "{expected}: {warnings:?}"
        );
        assert!(files_under(&fresh_dir.path().join("v1/actions")).is_empty());
    }
    // An entry past the size cap is not even read.
    overwrite(&entry_path, &vec![b' '; 2048]);
    let small = remote_at(&t.remote_dir, RemoteMode::ReadOnly).with_limits(RemoteLimits {
        max_entry_bytes: 1024,
        ..Default::default()
    });
    let fresh_dir = tempfile::tempdir().unwrap();
    let b = Cache::open(fresh_dir.path()).unwrap().with_remote(small);
    assert!(b.lookup(&m.key).unwrap().is_none());
    assert!(error_text(&b.take_remote_warnings()[0]).contains("1024-byte limit"));
}

#[test]
fn a_short_local_blob_is_downloaded_again() {
    let t = team(RemoteMode::ReadWrite);
    let m = commit(&t.a, 1, &[("f.txt", b"the whole content")], b"");
    let fresh_dir = tempfile::tempdir().unwrap();
    let b = Cache::open(fresh_dir.path())
        .unwrap()
        .with_remote(remote_at(&t.remote_dir, RemoteMode::ReadOnly));
    // A blob cut short (say, by a crash of a copy into the store) is already there.
    let blob = b.blob_path(&m.files[0].digest);
    fs::create_dir_all(blob.parent().unwrap()).unwrap();
    fs::write(&blob, b"the whole").unwrap();
    let got = b.lookup(&m.key).unwrap().expect("downloaded");
    let dir = b.materialize(&got).unwrap();
    assert_eq!(fs::read(dir.join("f.txt")).unwrap(), b"the whole content");
    assert!(b.verify().unwrap().problems.is_empty());
}

fn error_text(w: &RemoteWarning) -> String {
    w.message.clone()
}

#[test]
fn a_remote_that_is_down_warns_once_and_everything_goes_on_locally() {
    let dirs = tempfile::tempdir().unwrap();
    let cache = Cache::open(dirs.path().join("c"))
        .unwrap()
        .with_remote(remote_at(
            &dirs.path().join("not-mounted"),
            RemoteMode::ReadWrite,
        ));
    assert!(cache.lookup(&key(1)).unwrap().is_none());
    assert!(cache.find(&key(2)).unwrap().is_none());
    let m = commit(&cache, 3, &[("f", b"f")], b"");
    assert!(
        cache.lookup(&m.key).unwrap().is_some(),
        "the local commit stands"
    );
    let warnings = cache.take_remote_warnings();
    assert_eq!(
        warnings.len(),
        1,
        "one warning, not one per key: {warnings:?}"
    );
    assert!(warnings[0].message.contains("unreachable"), "{warnings:?}");
    assert!(
        warnings[0].message.contains("local cache only"),
        "{warnings:?}"
    );
    assert!(matches!(
        cache.push(None),
        Err(CacheError::Remote(RemoteError::Unavailable { .. }))
    ));
}

#[test]
fn two_members_finishing_the_same_key_end_with_one_entry() {
    let t = team(RemoteMode::ReadWrite);
    // Not deterministic: the two runs write different bytes under one key.
    let first = commit(&t.a, 7, &[("out.txt", b"run of A")], b"");
    let second = commit(&t.b, 7, &[("out.txt", b"run of B")], b"");
    assert_eq!(first.key, second.key);
    assert!(t.a.take_remote_warnings().is_empty());
    assert!(
        t.b.take_remote_warnings().is_empty(),
        "losing the race is no problem"
    );
    let entries = files_under(&t.remote_dir.join("v1/actions"));
    assert_eq!(entries.len(), 1);
    let c = Cache::open(t.a.root().join("../c"))
        .unwrap()
        .with_remote(remote_at(&t.remote_dir, RemoteMode::ReadOnly));
    let got = c.lookup(&first.key).unwrap().unwrap();
    assert_eq!(got.tree, first.tree, "the first entry wins, whole");
    let out = c.materialize(&got).unwrap();
    assert_eq!(fs::read(out.join("out.txt")).unwrap(), b"run of A");
    assert!(files_under(&t.remote_dir.join("v1/tmp")).is_empty());
}

#[test]
fn read_only_members_download_but_never_upload() {
    let t = team(RemoteMode::ReadOnly);
    let m = commit(&t.b, 1, &[("f", b"from b")], b"");
    assert!(files_under(&t.remote_dir).is_empty());
    assert!(matches!(
        t.b.push(None),
        Err(CacheError::Remote(RemoteError::ReadOnly { .. }))
    ));
    let report = t.a.pull(None).unwrap();
    assert_eq!(report.transferred, 0);
    assert!(t.a.lookup_local(&m.key).unwrap().is_none());
}

#[test]
fn push_and_pull_sync_everything_and_report_what_they_did() {
    let dirs = tempfile::tempdir().unwrap();
    let remote_dir = dirs.path().join("remote");
    fs::create_dir(&remote_dir).unwrap();
    let offline = Cache::open(dirs.path().join("a")).unwrap();
    let m1 = commit(&offline, 1, &[("f", b"one")], b"log");
    let m2 = commit(&offline, 2, &[("g", b"two")], b"");
    let a = Cache::open(dirs.path().join("a"))
        .unwrap()
        .with_remote(remote_at(&remote_dir, RemoteMode::ReadWrite));
    let pushed = a.push(None).unwrap();
    assert_eq!((pushed.transferred, pushed.present), (2, 0));
    let again = a.push(Some(&[m1.key, key(50)])).unwrap();
    assert_eq!((again.transferred, again.present, again.absent), (0, 1, 1));
    let b = Cache::open(dirs.path().join("b"))
        .unwrap()
        .with_remote(remote_at(&remote_dir, RemoteMode::ReadOnly));
    let pulled = b.pull(Some(&[m2.key])).unwrap();
    assert_eq!(pulled.transferred, 1);
    assert!(b.lookup_local(&m1.key).unwrap().is_none());
    let all = b.pull(None).unwrap();
    assert_eq!((all.transferred, all.present), (1, 1));
    assert!(b.lookup_local(&m1.key).unwrap().is_some());
    assert!(b.verify().unwrap().problems.is_empty());
}

#[test]
fn debug_shows_the_location_and_nothing_else() {
    let remote = remote_at(Path::new("/shared/cache"), RemoteMode::ReadOnly);
    let text = format!("{remote:?}");
    assert!(
        text.contains("/shared/cache") && text.contains("ReadOnly"),
        "{text}"
    );
}
