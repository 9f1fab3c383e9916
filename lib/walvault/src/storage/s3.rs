//! Storage on an S3-compatible object store (AWS S3, MinIO, Ceph RGW,
//! Garage), through the `object_store` crate.
//!
//! The [`Storage`] trait is synchronous; [`S3Storage`] owns a small tokio
//! current-thread runtime and blocks on each request. Every request has a
//! deadline (`request-timeout`); transient failures (timeouts, 5xx, 429,
//! connection resets) are retried by `object_store` with exponential
//! backoff until the total budget (`retry-budget`) is spent.
//!
//! Create-once is a conditional PUT (`If-None-Match: *`): the store itself
//! decides which of two concurrent writers wins.
//!
//! Credentials come from, in order: the `credentials-file` named in the
//! configuration, the `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`
//! (/`AWS_SESSION_TOKEN`) environment variables, or web identity
//! (`AWS_WEB_IDENTITY_TOKEN_FILE` with `AWS_ROLE_ARN`). `anonymous = true`
//! sends unsigned requests. With none of these, opening fails: the instance
//! metadata service is never asked, since on a host without one every
//! lookup would hang until its timeout, once per WAL file.

use std::io;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
};
use serde::Deserialize;

use super::{ObjectMeta, PutOutcome, Storage, StorageError, TEMP_PREFIX, validate_key};
use crate::config::S3Settings;

/// A parsed `s3://bucket/prefix` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    /// The bucket.
    pub bucket: String,
    /// The key prefix inside the bucket, without leading or trailing `/`;
    /// may be empty.
    pub prefix: String,
}

impl S3Url {
    /// Parses `s3://bucket` or `s3://bucket/some/prefix`.
    ///
    /// # Errors
    /// A description of what is wrong with the URL.
    pub fn parse(url: &str) -> Result<S3Url, String> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| format!("'{url}' does not start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(format!(
                "bucket name '{}' in '{url}' must be 3-63 lowercase letters, digits, '-' or '.'",
                bucket.escape_default()
            ));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            validate_key(prefix).map_err(|e| format!("prefix in '{url}': {e}"))?;
        }
        Ok(S3Url { bucket: bucket.to_string(), prefix: prefix.to_string() })
    }
}

/// A `credentials-file`: TOML with `access-key-id`, `secret-access-key` and
/// optionally `session-token`. Never printed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CredentialsFile {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

fn read_credentials(path: &FsPath) -> Result<CredentialsFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("unable to read credentials file '{}': {e}", path.display()))?;
    // The TOML error may quote the offending line, which can hold a secret:
    // only its position is reported.
    toml::from_str::<CredentialsFile>(&text).map_err(|e| {
        let at = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        format!(
            "credentials file '{}' is not valid (expected TOML with access-key-id and secret-access-key){}",
            path.display(),
            at.map(|l| format!(" at line {l}")).unwrap_or_default()
        )
    })
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Objects in an S3 bucket, under a prefix.
pub struct S3Storage {
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
    url: S3Url,
    /// For error messages: which server.
    endpoint: String,
}

impl S3Storage {
    /// Opens `url` (`s3://bucket/prefix`) with `settings`. Performs no
    /// network I/O.
    ///
    /// # Errors
    /// A description of a bad URL, a bad setting, or missing credentials.
    pub fn open(url: &str, settings: &S3Settings) -> Result<S3Storage, String> {
        let url = S3Url::parse(url)?;
        if let Some(ep) = &settings.endpoint
            && ep.contains('@')
        {
            return Err("s3.endpoint must not contain credentials ('user:password@')".into());
        }
        let request_timeout = Duration::from_secs(settings.request_timeout_secs.max(1));
        let options = ClientOptions::new()
            .with_allow_http(settings.allow_http)
            .with_connect_timeout(request_timeout.min(Duration::from_secs(10)))
            .with_timeout(request_timeout);
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(15),
                base: 2.0,
            },
            max_retries: 10,
            retry_timeout: Duration::from_secs(settings.retry_budget_secs),
        };
        // AmazonS3Builder::new(), not from_env(): only the variables read
        // below are honoured, so nothing selects the metadata service.
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&url.bucket)
            .with_region(&settings.region)
            .with_virtual_hosted_style_request(!settings.path_style)
            .with_allow_http(settings.allow_http)
            .with_client_options(options)
            .with_retry(retry);
        if let Some(ep) = &settings.endpoint {
            builder = builder.with_endpoint(ep);
        }
        if settings.anonymous {
            builder = builder.with_skip_signature(true);
        } else if let Some(path) = &settings.credentials_file {
            let c = read_credentials(path)?;
            builder = builder.with_access_key_id(c.access_key_id).with_secret_access_key(c.secret_access_key);
            if let Some(t) = c.session_token {
                builder = builder.with_token(t);
            }
        } else if let (Some(id), Some(secret)) =
            (env_nonempty("AWS_ACCESS_KEY_ID"), env_nonempty("AWS_SECRET_ACCESS_KEY"))
        {
            builder = builder.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(t) = env_nonempty("AWS_SESSION_TOKEN") {
                builder = builder.with_token(t);
            }
        } else if env_nonempty("AWS_WEB_IDENTITY_TOKEN_FILE").is_some() && env_nonempty("AWS_ROLE_ARN").is_some() {
            // object_store's builder picks web identity up from these two
            // variables itself when no static key is set.
        } else {
            return Err(format!(
                "no credentials for s3://{}: set s3.credentials-file, the AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY environment variables, AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, \
                 or s3.anonymous = true (the instance metadata service is never used)",
                url.bucket
            ));
        }
        let store = builder.build().map_err(|e| format!("s3://{}: {e}", url.bucket))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("unable to start the I/O runtime: {e}"))?;
        let endpoint = settings.endpoint.clone().unwrap_or_else(|| format!("AWS S3 {}", settings.region));
        Ok(S3Storage { store: Arc::new(store), runtime, url, endpoint })
    }

    fn path(&self, key: &str) -> Path {
        if self.url.prefix.is_empty() { Path::from(key) } else { Path::from(format!("{}/{key}", self.url.prefix)) }
    }

    fn checked(&self, key: &str) -> Result<Path, StorageError> {
        validate_key(key)?;
        Ok(self.path(key))
    }

    fn err(&self, key: &str, e: object_store::Error) -> StorageError {
        use object_store::Error as E;
        let kind = match &e {
            E::NotFound { .. } => return StorageError::NotFound { key: key.to_string() },
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
            E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => io::ErrorKind::InvalidInput,
            E::NotSupported { .. } | E::NotImplemented => io::ErrorKind::Unsupported,
            E::AlreadyExists { .. } => io::ErrorKind::AlreadyExists,
            // object_store has already retried what it could within the
            // budget; a timeout or unreachable store may still succeed later.
            _ => {
                let text = e.to_string();
                if text.contains("timed out") || text.contains("timeout") {
                    io::ErrorKind::TimedOut
                } else if text.contains("Client error") && !text.contains("429") {
                    // A 4xx other than 429 will not fix itself.
                    io::ErrorKind::InvalidInput
                } else {
                    io::ErrorKind::Other
                }
            }
        };
        StorageError::Io {
            key: key.to_string(),
            source: io::Error::new(kind, format!("{} ({}): {e}", self.location(), self.endpoint)),
        }
    }

    fn meta(&self, m: &object_store::ObjectMeta) -> Option<ObjectMeta> {
        let full = m.location.as_ref();
        let key = if self.url.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(self.url.prefix.as_str())?.strip_prefix('/')?
        };
        if key.split('/').any(|c| c.starts_with(TEMP_PREFIX)) {
            return None;
        }
        Some(ObjectMeta { key: key.to_string(), size: m.size, modified_ms: m.last_modified.timestamp_millis() })
    }

    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<Option<ObjectMeta>, StorageError> {
        let path = self.checked(key)?;
        let opts = PutOptions { mode, ..Default::default() };
        let payload = PutPayload::from(data.to_vec());
        match self.runtime.block_on(self.store.put_opts(&path, payload, opts)) {
            Ok(_) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: data.len() as u64,
                modified_ms: crate::repo::now_ms(),
            })),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(None),
            Err(e) => Err(self.err(key, e)),
        }
    }
}

impl Storage for S3Storage {
    /// `s3://bucket/prefix`: the repository URL, normalized. It is also
    /// what restore writes into `restore_command` (`--repository`) and what
    /// the catalog binds, so it must reopen the same repository: the
    /// endpoint, which comes from `[s3]`, is not part of it.
    fn location(&self) -> String {
        if self.url.prefix.is_empty() {
            format!("s3://{}", self.url.bucket)
        } else {
            format!("s3://{}/{}", self.url.bucket, self.url.prefix)
        }
    }

    fn put_new(&self, key: &str, data: &[u8]) -> Result<PutOutcome, StorageError> {
        Ok(match self.put(key, data, PutMode::Create)? {
            Some(meta) => PutOutcome::Created(meta),
            None => PutOutcome::Exists,
        })
    }

    fn put_replace(&self, key: &str, data: &[u8]) -> Result<ObjectMeta, StorageError> {
        self.put(key, data, PutMode::Overwrite)?.ok_or_else(|| StorageError::Io {
            key: key.to_string(),
            source: io::Error::other("overwrite reported an existing object"),
        })
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        let path = self.checked(key)?;
        self.runtime
            .block_on(async { self.store.get(&path).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| self.err(key, e))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
        let path = self.checked(key)?;
        if len > 0 {
            let opts =
                GetOptions { range: Some(GetRange::Bounded(offset..offset.saturating_add(len))), ..Default::default() };
            match self.runtime.block_on(async { self.store.get_opts(&path, opts).await?.bytes().await }) {
                Ok(b) => return Ok(b.to_vec()),
                Err(e @ object_store::Error::NotFound { .. }) => return Err(self.err(key, e)),
                // A range starting at or past the end is refused by the
                // store; the trait answers it with no bytes.
                Err(e) => match self.head(key)? {
                    Some(m) if offset >= m.size => return Ok(Vec::new()),
                    _ => return Err(self.err(key, e)),
                },
            }
        }
        match self.head(key)? {
            Some(_) => Ok(Vec::new()),
            None => Err(StorageError::NotFound { key: key.to_string() }),
        }
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        let path = self.checked(key)?;
        match self.runtime.block_on(self.store.head(&path)) {
            Ok(m) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: m.size,
                modified_ms: m.last_modified.timestamp_millis(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let trimmed = prefix.trim_end_matches('/');
        if !trimmed.is_empty() {
            validate_key(trimmed)?;
        }
        let full = match (self.url.prefix.is_empty(), trimmed.is_empty()) {
            (true, true) => None,
            (true, false) => Some(Path::from(trimmed)),
            (false, true) => Some(Path::from(self.url.prefix.as_str())),
            (false, false) => Some(Path::from(format!("{}/{trimmed}", self.url.prefix))),
        };
        // object_store pages through ListObjectsV2 continuation tokens.
        let all: Vec<object_store::ObjectMeta> =
            self.runtime.block_on(self.store.list(full.as_ref()).try_collect()).map_err(|e| self.err(prefix, e))?;
        Ok(all.iter().filter_map(|m| self.meta(m)).filter(|m| m.key.starts_with(prefix)).collect())
    }

    fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.checked(key)?;
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(S3Url::parse("s3://bucket").unwrap(), S3Url { bucket: "bucket".into(), prefix: String::new() });
        assert_eq!(S3Url::parse("s3://my-bucket/a/b/").unwrap().prefix, "a/b");
        for bad in ["s3://", "s3://B", "s3://ab", "s3://bucket/a//b", "s3://bucket/../x", "http://bucket/x"] {
            assert!(S3Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_file_errors_never_quote_it() {
        let dir = std::env::temp_dir().join(format!("walvault-s3cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("creds.toml");
        std::fs::write(&p, "access-key-id = \"AKID\"\nsecret-access-key = SUPERSECRET\n").unwrap();
        let e = read_credentials(&p).err().unwrap();
        assert!(!e.contains("SUPERSECRET") && e.contains("line 2"), "{e}");
        std::fs::write(&p, "access-key-id = \"AKID\"\nsecret-access-key = \"SUPERSECRET\"\n").unwrap();
        let settings = S3Settings {
            endpoint: Some("http://127.0.0.1:9".into()),
            allow_http: true,
            path_style: true,
            credentials_file: Some(p),
            ..S3Settings::default()
        };
        let s = S3Storage::open("s3://bucket/pre", &settings).unwrap();
        assert_eq!(s.location(), "s3://bucket/pre");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
