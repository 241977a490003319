//! Reading documents, streamed: RedPajama-style JSON Lines (`{"text": ..., "meta": ...}` per
//! line) and plain text files split on a separator, each optionally `.zst` or `.gz`. Bytes that
//! are not UTF-8 become U+FFFD (lossy cleaning), and NUL characters are dropped.

use std::borrow::Cow;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::DataError;

/// How to read the files of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// By file name: `.jsonl`/`.ndjson` are JSON Lines, `.txt` is text; anything else is
    /// skipped in a directory.
    Auto,
    Jsonl,
    Text,
}

impl Format {
    pub(crate) const NAMES: [&'static str; 3] = ["auto", "jsonl", "text"];

    pub(crate) fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "auto" => Format::Auto,
            "jsonl" => Format::Jsonl,
            "text" => Format::Text,
            _ => return None,
        })
    }
}

/// What one file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum FileFormat {
    Jsonl,
    Text,
}

#[derive(Debug, Clone)]
pub(crate) struct ReadOptions {
    pub format: Format,
    /// The JSON field holding the text.
    pub text_field: String,
    /// Splits a text file into documents; `None` makes each file one document.
    pub separator: Option<String>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            format: Format::Auto,
            text_field: "text".into(),
            separator: None,
        }
    }
}

/// One document, cleaned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Doc {
    pub text: String,
    /// Whether cleaning changed it (bytes that were not UTF-8, NULs).
    pub cleaned: bool,
}

/// The file name without a `.zst`/`.gz` suffix.
fn inner_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    for suffix in [".zst", ".zstd", ".gz"] {
        if let Some(stem) = name.strip_suffix(suffix) {
            return stem.to_string();
        }
    }
    name
}

fn format_by_name(path: &Path) -> Option<FileFormat> {
    let name = inner_name(path);
    if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        Some(FileFormat::Jsonl)
    } else if name.ends_with(".txt") || name.ends_with(".text") {
        Some(FileFormat::Text)
    } else {
        None
    }
}

/// The files of a source, sorted by path: the file itself, or every matching file under a
/// directory (hidden files skipped).
pub(crate) fn source_files(
    path: &Path,
    format: Format,
) -> Result<Vec<(PathBuf, FileFormat)>, DataError> {
    let pick = |p: &Path, explicit: bool| -> Option<FileFormat> {
        match format {
            Format::Jsonl => Some(FileFormat::Jsonl),
            Format::Text => Some(FileFormat::Text),
            // A file named on its own is JSON Lines unless its name says text.
            Format::Auto if explicit => Some(format_by_name(p).unwrap_or(FileFormat::Jsonl)),
            Format::Auto => format_by_name(p),
        }
    };
    let meta = fs::metadata(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Ok(pick(path, true)
            .map(|f| vec![(path.to_path_buf(), f)])
            .unwrap_or_default());
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(&dir).map_err(|source| DataError::Read {
            path: dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| DataError::Read {
                path: dir.clone(),
                source,
            })?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let p = entry.path();
            // Follows links: fan-out inputs are directories of links.
            if p.is_dir() {
                stack.push(p);
            } else if let Some(f) = pick(&p, false) {
                files.push((p, f));
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(DataError::NoSourceFiles {
            path: path.to_path_buf(),
        });
    }
    Ok(files)
}

/// The file's bytes, decompressed by its suffix.
pub(crate) fn open(path: &Path) -> Result<Box<dyn BufRead + Send>, DataError> {
    let read_err = |source| DataError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(read_err)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    const BUF: usize = 1 << 20;
    Ok(if name.ends_with(".zst") || name.ends_with(".zstd") {
        Box::new(BufReader::with_capacity(
            BUF,
            zstd::stream::read::Decoder::new(file).map_err(read_err)?,
        ))
    } else if name.ends_with(".gz") {
        Box::new(BufReader::with_capacity(
            BUF,
            flate2::read::MultiGzDecoder::new(file),
        ))
    } else {
        Box::new(BufReader::with_capacity(BUF, file))
    })
}

/// Lossy UTF-8, without NULs.
pub(crate) fn clean(bytes: &[u8]) -> Doc {
    match String::from_utf8_lossy(bytes) {
        Cow::Borrowed(s) => clean_string(s.to_string()),
        Cow::Owned(s) => Doc {
            cleaned: true,
            ..clean_string(s)
        },
    }
}

/// Without NULs.
fn clean_string(mut text: String) -> Doc {
    let cleaned = text.contains('\0');
    if cleaned {
        text.retain(|c| c != '\0');
    }
    Doc { text, cleaned }
}

/// A JSON Lines record, reading only `text` (other fields are skipped, not built).
#[derive(Deserialize)]
struct TextLine {
    #[serde(default)]
    text: Option<String>,
}

/// Calls `each` with every document of `files`, in order. `each` may stop the walk by
/// returning an error (say, [`DataError::Cancelled`]).
pub(crate) fn for_each_doc(
    files: &[(PathBuf, FileFormat)],
    options: &ReadOptions,
    mut each: impl FnMut(Doc) -> Result<(), DataError>,
) -> Result<(), DataError> {
    for (path, format) in files {
        let reader = open(path)?;
        match format {
            FileFormat::Jsonl => read_jsonl(path, reader, &options.text_field, &mut each)?,
            FileFormat::Text => read_text(path, reader, options.separator.as_deref(), &mut each)?,
        }
    }
    Ok(())
}

fn read_jsonl(
    path: &Path,
    mut reader: Box<dyn BufRead + Send>,
    field: &str,
    each: &mut impl FnMut(Doc) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|source| DataError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let bad = |message: String| DataError::BadLine {
            path: path.to_path_buf(),
            line: number,
            message,
        };
        // Invalid UTF-8 inside a JSON string becomes U+FFFD before parsing.
        let json = String::from_utf8_lossy(&line);
        let lossy = matches!(json, Cow::Owned(_));
        let text = if field == "text" {
            // The common case, without building the `meta` object.
            serde_json::from_str::<TextLine>(&json)
                .map_err(|e| bad(format!("not a JSON object with a string `{field}`: {e}")))?
                .text
        } else {
            let mut value: Value =
                serde_json::from_str(&json).map_err(|e| bad(format!("not a JSON object: {e}")))?;
            match value.get_mut(field).map(Value::take) {
                Some(Value::String(text)) => Some(text),
                Some(Value::Null) | None => None,
                Some(other) => {
                    return Err(bad(format!(
                        "`{field}` is not a string but {}",
                        type_name(&other)
                    )));
                }
            }
        };
        let Some(text) = text else {
            return Err(bad(format!("no `{field}` field")));
        };
        let mut doc = clean_string(text);
        doc.cleaned |= lossy;
        each(doc)?;
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Splits the stream on `separator` without holding more than one document (plus a read
/// buffer) in memory.
fn read_text(
    path: &Path,
    mut reader: Box<dyn BufRead + Send>,
    separator: Option<&str>,
    each: &mut impl FnMut(Doc) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let read_err = |source| DataError::Read {
        path: path.to_path_buf(),
        source,
    };
    let Some(sep) = separator.map(str::as_bytes).filter(|s| !s.is_empty()) else {
        let mut all = Vec::new();
        reader.read_to_end(&mut all).map_err(read_err)?;
        if !all.is_empty() {
            each(clean(&all))?;
        }
        return Ok(());
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut scanned = 0;
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut chunk).map_err(read_err)?;
        buf.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        while let Some(at) = find(&buf[scanned..], sep).map(|i| i + scanned) {
            if at > start {
                each(clean(&buf[start..at]))?;
            }
            start = at + sep.len();
            scanned = start;
        }
        buf.drain(..start);
        // A separator may straddle the next read: rescan its possible start.
        scanned = buf.len().saturating_sub(sep.len() - 1);
        if n == 0 {
            if !buf.is_empty() {
                each(clean(&buf))?;
            }
            return Ok(());
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let mut from = 0;
    while let Some(i) = haystack[from..].iter().position(|&b| b == first) {
        let at = from + i;
        if haystack[at..].starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn collect(files: &[(PathBuf, FileFormat)], options: &ReadOptions) -> Vec<Doc> {
        let mut docs = Vec::new();
        for_each_doc(files, options, |d| {
            docs.push(d);
            Ok(())
        })
        .expect("read");
        docs
    }

    #[test]
    fn jsonl_plain_zst_and_gz_read_the_same_documents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = "{\"text\": \"one\", \"meta\": {\"a\": 1}}\n\n{\"text\": \"two\\nlines\"}\n";
        fs::write(dir.path().join("a.jsonl"), text).expect("write");
        let zst = zstd::encode_all(text.as_bytes(), 3).expect("zstd");
        fs::write(dir.path().join("b.jsonl.zst"), zst).expect("write");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).expect("gz");
        fs::write(dir.path().join("c.jsonl.gz"), gz.finish().expect("gz")).expect("write");
        fs::write(dir.path().join("manifest.json"), "{}").expect("write");
        let files = source_files(dir.path(), Format::Auto).expect("files");
        assert_eq!(files.len(), 3, "manifest.json is not a source: {files:?}");
        let docs = collect(&files, &ReadOptions::default());
        let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "one",
                "two\nlines",
                "one",
                "two\nlines",
                "one",
                "two\nlines"
            ]
        );
    }

    #[test]
    fn invalid_utf8_and_nul_are_cleaned_and_flagged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("latin1.jsonl");
        fs::write(&path, b"{\"text\": \"caf\xe9 \\u0000ok\"}\n").expect("write");
        let docs = collect(&[(path, FileFormat::Jsonl)], &ReadOptions::default());
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].text, "caf\u{FFFD} ok");
        assert!(docs[0].cleaned);
    }

    #[test]
    fn a_bad_line_names_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.jsonl");
        fs::write(&path, "{\"text\": \"a\"}\n{\"body\": \"b\"}\n").expect("write");
        let err = for_each_doc(
            &[(path, FileFormat::Jsonl)],
            &ReadOptions::default(),
            |_| Ok(()),
        )
        .expect_err("line 2 has no text");
        let msg = err.to_string();
        assert!(msg.contains("x.jsonl` line 2: no `text` field"), "{msg}");
        let dir2 = tempfile::tempdir().expect("tempdir");
        let truncated = dir2.path().join("t.jsonl");
        fs::write(&truncated, "{\"text\": \"a\"}\n{\"text\": \"b").expect("write");
        let err = for_each_doc(
            &[(truncated, FileFormat::Jsonl)],
            &ReadOptions::default(),
            |_| Ok(()),
        )
        .expect_err("truncated");
        assert!(
            err.to_string().contains("line 2: not a JSON object"),
            "{err}"
        );
        fs::write(dir2.path().join("n.jsonl"), "{\"text\": 5}\n").expect("write");
        let err = for_each_doc(
            &[(dir2.path().join("n.jsonl"), FileFormat::Jsonl)],
            &ReadOptions::default(),
            |_| Ok(()),
        )
        .expect_err("a number is not text");
        assert!(err.to_string().contains("invalid type: integer"), "{err}");
    }

    #[test]
    fn another_text_field_can_be_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.jsonl");
        fs::write(
            &path,
            "{\"content\": \"a\", \"text\": 1}\n{\"content\": [1]}\n",
        )
        .expect("write");
        let options = ReadOptions {
            text_field: "content".into(),
            ..ReadOptions::default()
        };
        let mut docs = Vec::new();
        let err = for_each_doc(&[(path, FileFormat::Jsonl)], &options, |d| {
            docs.push(d.text);
            Ok(())
        })
        .expect_err("line 2's content is a list");
        assert_eq!(docs, ["a"]);
        assert!(
            err.to_string()
                .contains("line 2: `content` is not a string but a list"),
            "{err}"
        );
    }

    #[test]
    fn text_files_split_on_the_separator_across_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("book.txt");
        // Long enough that the separator falls across the 1 MiB read boundary.
        let first = "a".repeat((1 << 20) - 3);
        let body = format!("{first}\n\n=====\n\nsecond doc\n\n=====\n\n\n\n=====\n\nthird");
        fs::write(&path, &body).expect("write");
        let options = ReadOptions {
            separator: Some("\n\n=====\n\n".into()),
            ..ReadOptions::default()
        };
        let docs = collect(&[(path.clone(), FileFormat::Text)], &options);
        let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(
            texts,
            [first.as_str(), "second doc", "third"],
            "empty documents are skipped"
        );
        let whole = collect(&[(path, FileFormat::Text)], &ReadOptions::default());
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].text, body);
    }

    #[test]
    fn an_empty_directory_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("notes.md"), "x").expect("write");
        let err = source_files(dir.path(), Format::Auto).expect_err("nothing to read");
        assert!(matches!(err, DataError::NoSourceFiles { .. }));
        assert_eq!(
            source_files(dir.path(), Format::Text).expect("text").len(),
            1
        );
    }
}
