//! A remote cache in an object store, through the `object_store` crate (S3 and S3-compatible
//! stores here; GCS and Azure would come with its `gcp` and `azure` features). The store is
//! async; a current-thread tokio runtime owned by the backend drives it behind a blocking API,
//! and every request is bounded in time.
//!
//! Credentials come from the standard AWS environment and credential chain
//! (`AmazonS3Builder::from_env`: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, web identity, container and instance credentials) and are never
//! printed: this type's `Debug` shows only the location.

use std::fmt;
use std::future::Future;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig,
};

use super::{Backend, RemoteError, sink_error};

/// Blobs up to this size go up in one create-only put; larger ones in parts of this size.
const PART_SIZE: usize = 16 << 20;
/// How many request time-outs one part (or a single put of up to a part) may take: with the
/// default 15 s, a part must move at 140 KB/s or more.
const PART_TIMEOUTS: u32 = 8;

pub(crate) struct ObjectStoreBackend {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    display: String,
    runtime: tokio::runtime::Runtime,
    /// Bound on one small request, and on each chunk or part of a large transfer.
    timeout: Duration,
}

impl fmt::Debug for ObjectStoreBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStoreBackend")
            .field("location", &self.display)
            .finish_non_exhaustive()
    }
}

impl ObjectStoreBackend {
    pub(crate) fn s3(
        bucket: &str,
        prefix: &str,
        display: String,
        timeout: Duration,
    ) -> Result<Self, RemoteError> {
        let open_err = |source: Box<dyn std::error::Error + Send + Sync>| RemoteError::Open {
            remote: display.clone(),
            source,
        };
        let secs = |d: Duration| format!("{}ms", d.as_millis().max(1));
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                secs(timeout.min(Duration::from_secs(10))),
            )
            // A stalled connection fails after `timeout` without a byte; a large transfer that
            // keeps moving is not cut short (its total is bounded per chunk and per part).
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ReadTimeout),
                secs(timeout),
            )
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "24h")
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: 2,
                retry_timeout: timeout,
            })
            .build()
            .map_err(|e| open_err(Box::new(e)))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| open_err(Box::new(e)))?;
        Ok(Self {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            display,
            runtime,
            timeout,
        })
    }

    fn path(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    fn unavailable(&self, e: object_store::Error) -> RemoteError {
        RemoteError::Unavailable {
            remote: self.display.clone(),
            source: Box::new(e),
        }
    }

    fn timed_out(&self, after: Duration) -> RemoteError {
        RemoteError::TimedOut {
            remote: self.display.clone(),
            secs: after.as_secs_f64(),
        }
    }

    /// Runs one request to completion within `after`.
    fn block<T>(
        &self,
        after: Duration,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> Result<object_store::Result<T>, RemoteError> {
        self.runtime
            .block_on(async { tokio::time::timeout(after, request).await })
            .map_err(|_| self.timed_out(after))
    }

    /// Streams an object into `sink`; `None` when absent.
    fn stream_to(
        &self,
        name: &str,
        limit: u64,
        sink: &mut dyn Write,
    ) -> Result<Option<()>, RemoteError> {
        let path = self.path(name);
        let timeout = self.timeout;
        let result: Result<Option<()>, RemoteError> = self.runtime.block_on(async {
            let got =
                tokio::time::timeout(timeout, self.store.get_opts(&path, GetOptions::default()))
                    .await
                    .map_err(|_| self.timed_out(timeout))?;
            let got = match got {
                Ok(got) => got,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.unavailable(e)),
            };
            if got.meta.size > limit {
                return Err(RemoteError::TooLarge {
                    name: name.into(),
                    limit,
                });
            }
            let mut stream = got.into_stream();
            let mut total: u64 = 0;
            loop {
                let chunk = tokio::time::timeout(timeout, stream.next())
                    .await
                    .map_err(|_| self.timed_out(timeout))?;
                let Some(chunk) = chunk else { break };
                let chunk = chunk.map_err(|e| self.unavailable(e))?;
                total += chunk.len() as u64;
                if total > limit {
                    return Err(RemoteError::TooLarge {
                        name: name.into(),
                        limit,
                    });
                }
                sink.write_all(&chunk)
                    .map_err(|e| sink_error(Path::new(name), e))?;
            }
            Ok(Some(()))
        });
        result
    }

    /// One small object, read whole within the request time-out.
    async fn get_small(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        let path = self.path(name);
        let got = tokio::time::timeout(self.timeout, async {
            let got = self.store.get_opts(&path, GetOptions::default()).await?;
            if got.meta.size > limit {
                return Ok(None);
            }
            got.bytes().await.map(Some)
        })
        .await;
        match got {
            Err(_) => Err(self.timed_out(self.timeout)),
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(None),
            Ok(Err(e)) => Err(self.unavailable(e)),
            Ok(Ok(None)) => Err(RemoteError::TooLarge {
                name: name.into(),
                limit,
            }),
            Ok(Ok(Some(bytes))) => Ok(Some(bytes.to_vec())),
        }
    }

    fn put_create(
        &self,
        name: &str,
        payload: PutPayload,
        after: Duration,
    ) -> Result<bool, RemoteError> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let path = self.path(name);
        match self.block(after, self.store.put_opts(&path, payload, options))? {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// A large blob, in parts. Multipart uploads cannot be made create-only, but a blob is
    /// named by its content: a concurrent upload of the same name writes the same bytes, and
    /// the object appears whole when the upload completes. Entries, which are create-only,
    /// are always small.
    fn put_parts(&self, name: &str, source: &Path) -> Result<bool, RemoteError> {
        let local = |e: std::io::Error| RemoteError::Local {
            source: Box::new(crate::io_err(source)(e)),
        };
        let path = self.path(name);
        let mut file = std::fs::File::open(source).map_err(local)?;
        let part_timeout = self.timeout * PART_TIMEOUTS;
        let mut upload = match self.block(self.timeout, self.store.put_multipart(&path))? {
            Ok(u) => u,
            Err(e) => return Err(self.unavailable(e)),
        };
        let result = (|| {
            loop {
                let mut part = Vec::with_capacity(PART_SIZE);
                (&mut file)
                    .take(PART_SIZE as u64)
                    .read_to_end(&mut part)
                    .map_err(local)?;
                if part.is_empty() {
                    break;
                }
                let last = part.len() < PART_SIZE;
                match self.block(part_timeout, upload.put_part(PutPayload::from(part)))? {
                    Ok(()) => {}
                    Err(e) => return Err(self.unavailable(e)),
                }
                if last {
                    break;
                }
            }
            match self.block(part_timeout, upload.complete())? {
                Ok(_) => Ok(true),
                Err(e) => Err(self.unavailable(e)),
            }
        })();
        if result.is_err() {
            let _ = self.block(self.timeout, upload.abort());
        }
        result
    }
}

/// Requests in flight at once when many small objects are read.
const CONCURRENT_GETS: usize = 32;

impl Backend for ObjectStoreBackend {
    fn get(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        let mut bytes = Vec::new();
        Ok(self.stream_to(name, limit, &mut bytes)?.map(|()| bytes))
    }

    fn get_many(&self, names: &[String], limit: u64) -> Vec<Result<Option<Vec<u8>>, RemoteError>> {
        self.runtime.block_on(
            futures_util::stream::iter(names)
                .map(|name| self.get_small(name, limit))
                .buffered(CONCURRENT_GETS)
                .collect(),
        )
    }

    fn get_to(&self, name: &str, limit: u64, sink: &mut dyn Write) -> Result<bool, RemoteError> {
        Ok(self.stream_to(name, limit, sink)?.is_some())
    }

    fn exists(&self, name: &str) -> Result<bool, RemoteError> {
        let path = self.path(name);
        match self.block(self.timeout, self.store.head(&path))? {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    fn create(&self, name: &str, bytes: &[u8]) -> Result<bool, RemoteError> {
        self.put_create(name, PutPayload::from(bytes.to_vec()), self.timeout * 2)
    }

    fn create_from_file(&self, name: &str, source: &Path) -> Result<bool, RemoteError> {
        let local = |e: std::io::Error| RemoteError::Local {
            source: Box::new(crate::io_err(source)(e)),
        };
        let len = std::fs::metadata(source).map_err(local)?.len();
        if len > PART_SIZE as u64 {
            return self.put_parts(name, source);
        }
        let bytes = std::fs::read(source).map_err(local)?;
        self.put_create(name, PutPayload::from(bytes), self.timeout * PART_TIMEOUTS)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, RemoteError> {
        let path = self.path(prefix.trim_end_matches('/'));
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let listed = self.block(self.timeout * 20, async {
            let mut names = Vec::new();
            let mut stream = self.store.list(Some(&path));
            while let Some(meta) = stream.next().await {
                let meta = meta?;
                let full = meta.location.to_string();
                names.push(full.strip_prefix(&strip).unwrap_or(&full).to_string());
            }
            Ok(names)
        })?;
        let mut names = listed.map_err(|e| self.unavailable(e))?;
        names.sort();
        Ok(names)
    }
}
