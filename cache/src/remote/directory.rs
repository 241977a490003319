//! A remote cache on a shared directory (an NFS mount). Every object is written to a temp file
//! in the remote's `v1/tmp/`, flushed, then hard-linked into place: `link` fails when the name
//! exists, which is the create-only put (with `renameat2(RENAME_NOREPLACE)` where a filesystem
//! has no hard links). Readers therefore see a whole object or none.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Backend, RemoteError, sink_error};

pub(crate) struct DirectoryBackend {
    root: PathBuf,
    display: String,
}

impl DirectoryBackend {
    pub(crate) fn new(root: PathBuf) -> Self {
        Self {
            display: root.display().to_string(),
            root,
        }
    }

    fn unavailable(&self, path: &Path, source: std::io::Error) -> RemoteError {
        RemoteError::Unavailable {
            remote: self.display.clone(),
            source: format!("{}: {source}", path.display()).into(),
        }
    }

    /// The root must exist: a missing mount is an outage, not an empty cache.
    fn check_root(&self) -> Result<(), RemoteError> {
        match fs::metadata(&self.root) {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(self.unavailable(&self.root, std::io::Error::other("not a directory"))),
            Err(e) => Err(self.unavailable(&self.root, e)),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        // Names are made by `Remote` from hex digests and fixed words: never `..` or absolute.
        self.root.join(name)
    }

    fn open(&self, name: &str) -> Result<Option<(fs::File, u64)>, RemoteError> {
        self.check_root()?;
        let path = self.path(name);
        match fs::File::open(&path) {
            Ok(file) => {
                let len = file
                    .metadata()
                    .map_err(|e| self.unavailable(&path, e))?
                    .len();
                Ok(Some((file, len)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.unavailable(&path, e)),
        }
    }

    fn temp_path(&self) -> Result<PathBuf, RemoteError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = self.root.join(crate::LAYOUT_VERSION).join("tmp");
        fs::create_dir_all(&dir).map_err(|e| self.unavailable(&dir, e))?;
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Ok(dir.join(format!(".{host}.{}.{n}", std::process::id())))
    }

    /// Writes a temp file with `fill`, flushes it, and links it in unless `name` exists.
    fn create_with(
        &self,
        name: &str,
        fill: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
    ) -> Result<bool, RemoteError> {
        self.check_root()?;
        let target = self.path(name);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(|e| self.unavailable(parent, e))?;
        }
        let tmp = self.temp_path()?;
        let result = (|| {
            let mut file = fs::File::create(&tmp)?;
            fill(&mut file)?;
            file.set_permissions(fs::Permissions::from_mode(0o444))?;
            file.sync_all()?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(self.unavailable(&tmp, e));
        }
        let linked = link_no_clobber(&tmp, &target);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(self.unavailable(&target, e)),
        }
    }
}

/// `link(from, to)`, failing with `AlreadyExists` when `to` exists; falls back to a rename that
/// refuses to replace where hard links are not supported.
fn link_no_clobber(from: &Path, to: &Path) -> std::io::Result<()> {
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
        Err(_) => rustix::fs::renameat_with(
            rustix::fs::CWD,
            from,
            rustix::fs::CWD,
            to,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(std::io::Error::from),
    }
}

impl Backend for DirectoryBackend {
    fn get(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        let Some((file, len)) = self.open(name)? else {
            return Ok(None);
        };
        if len > limit {
            return Err(RemoteError::TooLarge {
                name: name.into(),
                limit,
            });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| self.unavailable(&self.path(name), e))?;
        if bytes.len() as u64 > limit {
            return Err(RemoteError::TooLarge {
                name: name.into(),
                limit,
            });
        }
        Ok(Some(bytes))
    }

    fn get_to(&self, name: &str, limit: u64, sink: &mut dyn Write) -> Result<bool, RemoteError> {
        let Some((mut file, len)) = self.open(name)? else {
            return Ok(false);
        };
        if len > limit {
            return Err(RemoteError::TooLarge {
                name: name.into(),
                limit,
            });
        }
        let path = self.path(name);
        let mut buf = vec![0u8; 1 << 20];
        let mut total: u64 = 0;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.unavailable(&path, e)),
            };
            total += n as u64;
            if total > limit {
                return Err(RemoteError::TooLarge {
                    name: name.into(),
                    limit,
                });
            }
            sink.write_all(&buf[..n])
                .map_err(|e| sink_error(&path, e))?;
        }
        Ok(true)
    }

    fn exists(&self, name: &str) -> Result<bool, RemoteError> {
        self.check_root()?;
        let path = self.path(name);
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.unavailable(&path, e)),
        }
    }

    fn create(&self, name: &str, bytes: &[u8]) -> Result<bool, RemoteError> {
        self.create_with(name, |file| file.write_all(bytes))
    }

    fn create_from_file(&self, name: &str, source: &Path) -> Result<bool, RemoteError> {
        let mut input = fs::File::open(source).map_err(|e| RemoteError::Local {
            source: Box::new(crate::io_err(source)(e)),
        })?;
        self.create_with(name, |file| std::io::copy(&mut input, file).map(|_| ()))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, RemoteError> {
        self.check_root()?;
        let mut out = Vec::new();
        let start = self.path(prefix.trim_end_matches('/'));
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.unavailable(&dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.unavailable(&dir, e))?;
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(&self.root)
                    && let Some(rel) = rel.to_str()
                {
                    out.push(rel.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }
}
