//! Blobs: file contents stored once under their blake3.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::{ArtifactDigest, Cache, CacheError, create_dir, io_err};

/// Files at least this large are hashed with memory-mapping across threads.
const MMAP_THRESHOLD: u64 = 16 << 20;

/// blake3 of a file's contents.
pub fn hash_file(path: &Path) -> Result<ArtifactDigest, CacheError> {
    let len = fs::metadata(path).map_err(io_err(path))?.len();
    let mut hasher = blake3::Hasher::new();
    if len >= MMAP_THRESHOLD {
        hasher.update_mmap_rayon(path).map_err(io_err(path))?;
    } else {
        let file = fs::File::open(path).map_err(io_err(path))?;
        hasher.update_reader(file).map_err(io_err(path))?;
    }
    Ok(hasher.finalize().into())
}

fn len_of(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(u64::MAX)
}

impl Cache {
    /// Where a blob lives when stored raw.
    pub fn blob_path(&self, digest: &ArtifactDigest) -> PathBuf {
        let hex = digest.to_hex();
        self.base.join("blobs").join(&hex[..2]).join(hex)
    }

    pub(crate) fn compressed_blob_path(&self, digest: &ArtifactDigest) -> PathBuf {
        let mut path = self.blob_path(digest).into_os_string();
        path.push(".zst");
        path.into()
    }

    /// Whether the blob is present, raw or compressed.
    pub fn has_blob(&self, digest: &ArtifactDigest) -> bool {
        self.blob_path(digest).exists() || self.compressed_blob_path(digest).exists()
    }

    /// Whether the store holds the blob at `size` bytes, when the size is known: a short blob
    /// (an interrupted write, a damaged store) does not count. A compressed blob's size is
    /// known only by decoding it, so its presence counts.
    pub(crate) fn has_blob_of_size(&self, digest: &ArtifactDigest, size: Option<u64>) -> bool {
        match fs::metadata(self.blob_path(digest)) {
            Ok(meta) => size.is_none_or(|size| meta.len() == size),
            Err(_) => self.compressed_blob_path(digest).exists(),
        }
    }

    /// Moves a finished file into the store (a rename, no copy) and returns its digest. If the
    /// blob exists already the file is dropped: identical bytes are stored once.
    pub(crate) fn adopt_file(&self, path: &Path) -> Result<ArtifactDigest, CacheError> {
        use std::os::unix::fs::MetadataExt;
        // A file with other links (`ln /outside/file $AUTOSCALE_OUT/f`) is not ours to take
        // over: renaming or chmodding it would make a file outside the cache a blob, and a
        // later edit of that file would change the cached result under its digest. Its bytes
        // are copied into a file of our own, which is then adopted.
        if fs::symlink_metadata(path).map_err(io_err(path))?.nlink() > 1 {
            let copy = self.tmp_file("adopt");
            fs::copy(path, &copy).map_err(io_err(&copy))?;
            fs::remove_file(path).map_err(io_err(path))?;
            return self.adopt_file(&copy);
        }
        let digest = hash_file(path)?;
        let target = self.blob_path(&digest);
        // An existing blob of another size was damaged: the fresh bytes replace it.
        if fs::metadata(&target).is_ok_and(|blob| blob.len() == len_of(path)) {
            fs::remove_file(path).map_err(io_err(path))?;
            return Ok(digest);
        }
        create_dir(target.parent().unwrap_or(&self.base))?;
        let mut perms = fs::metadata(path).map_err(io_err(path))?.permissions();
        perms.set_mode(perms.mode() & 0o555);
        fs::set_permissions(path, perms).map_err(io_err(path))?;
        fs::rename(path, &target).map_err(io_err(&target))?;
        Ok(digest)
    }

    /// Stores bytes as a blob, zstd-compressed when that saves at least a tenth.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<ArtifactDigest, CacheError> {
        let digest = ArtifactDigest::from(blake3::hash(bytes));
        if self.has_blob(&digest) {
            return Ok(digest);
        }
        let compressed = if bytes.len() >= 4096 {
            zstd::bulk::compress(bytes, 3).ok()
        } else {
            None
        };
        let (target, payload) = match &compressed {
            Some(c) if c.len() * 10 <= bytes.len() * 9 => {
                (self.compressed_blob_path(&digest), &c[..])
            }
            _ => (self.blob_path(&digest), bytes),
        };
        create_dir(target.parent().unwrap_or(&self.base))?;
        let tmp = self.tmp_file("blob");
        let mut file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(payload).map_err(io_err(&tmp))?;
        drop(file);
        fs::rename(&tmp, &target).map_err(io_err(&target))?;
        Ok(digest)
    }

    /// Reads a blob's (decompressed) bytes.
    pub fn read_blob(&self, digest: &ArtifactDigest) -> Result<Vec<u8>, CacheError> {
        let raw = self.blob_path(digest);
        match fs::read(&raw) {
            Ok(bytes) => return Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&raw)(e)),
        }
        let zst = self.compressed_blob_path(digest);
        let file = fs::File::open(&zst).map_err(|_| CacheError::MissingBlob {
            digest: digest.to_hex(),
        })?;
        let mut out = Vec::new();
        zstd::Decoder::new(file)
            .and_then(|mut d| d.read_to_end(&mut out))
            .map_err(io_err(&zst))?;
        Ok(out)
    }

    /// Checks that a blob's bytes still hash to its name.
    pub(crate) fn blob_is_intact(&self, digest: &ArtifactDigest) -> Result<bool, CacheError> {
        let raw = self.blob_path(digest);
        if raw.exists() {
            return Ok(hash_file(&raw)? == *digest);
        }
        match self.read_blob(digest) {
            Ok(bytes) => Ok(ArtifactDigest::from(blake3::hash(&bytes)) == *digest),
            // Missing, or a compressed blob that no longer decodes: damaged, which `verify`
            // reports rather than fails on.
            Err(CacheError::MissingBlob { .. } | CacheError::Io { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_and_read_compressible_and_small_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let big = "line of a log\n".repeat(1000);
        let d = cache.put_bytes(big.as_bytes()).unwrap();
        assert!(cache.compressed_blob_path(&d).exists(), "a log compresses");
        assert_eq!(cache.read_blob(&d).unwrap(), big.as_bytes());
        let small = cache.put_bytes(b"tiny").unwrap();
        assert!(cache.blob_path(&small).exists());
        assert!(cache.blob_is_intact(&small).unwrap());
        assert!(cache.blob_is_intact(&d).unwrap());
    }
}
