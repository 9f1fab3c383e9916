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
//! decides which of two concurrent writers wins ([`ConditionalCreate::Trust`]).
//! Some S3-compatible stores (Garage 2.5) ignore the header and overwrite;
//! [`Storage::probe_conditional_create`] finds out, and
//! [`ConditionalCreate::CheckFirst`] then looks (HEAD) before writing. That
//! fallback leaves a race: two writers of the same key between one's HEAD
//! and its PUT both write, and the last one wins. For WAL that needs two
//! servers archiving the same name into the same repository at the same
//! moment (PostgreSQL pushes one file at a time per cluster).
//!
//! Errors are reduced to one line that names the endpoint and the bucket:
//! refused credentials, a missing bucket (never reported as a missing
//! object: archive-fetch must not answer "not in the archive" for it), a
//! deadline passed, an unreachable endpoint, a server error after retries.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
};
use serde::Deserialize;

use super::{ConditionalCreate, Fault, ObjectMeta, PutOutcome, Storage, StorageError, TEMP_PREFIX, validate_key};
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
    /// `request-timeout`, for messages.
    request_timeout: Duration,
    /// `retry-budget`, for messages.
    retry_budget: Duration,
    /// [`ConditionalCreate::CheckFirst`] when set. Atomic so that the
    /// repository layer can choose through `&dyn Storage`.
    check_first: AtomicBool,
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
        Ok(S3Storage {
            store: Arc::new(store),
            runtime,
            url,
            endpoint,
            request_timeout,
            retry_budget: Duration::from_secs(settings.retry_budget_secs),
            check_first: AtomicBool::new(false),
        })
    }

    /// Opens as [`S3Storage::open`] with create-once enforced as `mode`
    /// from the start.
    ///
    /// # Errors
    /// As [`S3Storage::open`].
    pub fn open_with_mode(url: &str, settings: &S3Settings, mode: ConditionalCreate) -> Result<S3Storage, String> {
        let s = S3Storage::open(url, settings)?;
        s.set_conditional_create(mode);
        Ok(s)
    }

    /// The endpoint requests go to, for messages (`http://127.0.0.1:9000`,
    /// or `AWS S3 <region>`). Never contains secrets.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn path(&self, key: &str) -> Path {
        if self.url.prefix.is_empty() { Path::from(key) } else { Path::from(format!("{}/{key}", self.url.prefix)) }
    }

    fn checked(&self, key: &str) -> Result<Path, StorageError> {
        validate_key(key)?;
        Ok(self.path(key))
    }

    fn err(&self, key: &str, e: object_store::Error) -> StorageError {
        let d = Diagnosis::of(&e);
        if matches!(e, object_store::Error::NotFound { .. }) && !d.bucket_missing() {
            return StorageError::NotFound { key: key.to_string() };
        }
        let (kind, fault) = self.describe(key, &e, &d);
        StorageError::Io { key: key.to_string(), source: io::Error::new(kind, fault) }
    }

    /// One line for a failed request, its error kind (which decides
    /// [`StorageError::is_transient`]) and advice. `object_store`'s own text
    /// (a URL, retry counters, an XML body) is kept only for failures this
    /// does not recognize.
    fn describe(&self, key: &str, e: &object_store::Error, d: &Diagnosis) -> (io::ErrorKind, Fault) {
        use object_store::Error as E;
        let (ep, bucket) = (&self.endpoint, &self.url.bucket);
        let code = d.code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default();
        let fault = |message: String, hint: Option<&str>| Fault { message, hint: hint.map(str::to_string) };
        if d.bucket_missing() {
            return (
                io::ErrorKind::NotFound,
                fault(
                    format!("bucket '{bucket}' does not exist at {ep}"),
                    Some("create the bucket, or check the bucket in 'repository' and s3.endpoint"),
                ),
            );
        }
        let denied = matches!(e, E::PermissionDenied { .. } | E::Unauthenticated { .. })
            || matches!(d.status, Some(401 | 403))
            || d.code.as_deref().is_some_and(|c| {
                ["AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken", "InvalidToken"]
                    .contains(&c)
            });
        if denied {
            return (
                io::ErrorKind::PermissionDenied,
                fault(
                    format!("access denied by {ep} for bucket '{bucket}'{code}: the credentials were refused"),
                    Some(
                        "check the credentials (s3.credentials-file, or AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY) and that they may read and write the bucket",
                    ),
                ),
            );
        }
        let budget = format!(
            "request-timeout {}s, retry-budget {}s",
            self.request_timeout.as_secs(),
            self.retry_budget.as_secs()
        );
        match d.http {
            Some(HttpErrorKind::Timeout) => {
                return (
                    io::ErrorKind::TimedOut,
                    fault(
                        format!("timed out waiting for {ep} (bucket '{bucket}', key '{key}'; {budget})"),
                        Some("the object store is slow or unreachable; the request is retried later"),
                    ),
                );
            }
            Some(HttpErrorKind::Connect) => {
                return (
                    io::ErrorKind::ConnectionRefused,
                    fault(
                        format!("unable to connect to {ep} (bucket '{bucket}'; {budget}): {}", d.innermost),
                        Some("check s3.endpoint and that the object store is running and reachable"),
                    ),
                );
            }
            Some(HttpErrorKind::Request | HttpErrorKind::Interrupted) => {
                return (
                    io::ErrorKind::ConnectionReset,
                    fault(
                        format!("connection to {ep} lost (bucket '{bucket}', key '{key}'; {budget}): {}", d.innermost),
                        None,
                    ),
                );
            }
            _ => {}
        }
        if let Some(status) = d.status.filter(|s| *s >= 500 || *s == 429) {
            return (
                io::ErrorKind::Other,
                fault(
                    format!(
                        "{ep} answered HTTP {status}{code} for bucket '{bucket}', key '{key}' after retrying ({budget})"
                    ),
                    Some("the object store is overloaded or failing; the request is retried later"),
                ),
            );
        }
        let kind = match e {
            E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => io::ErrorKind::InvalidInput,
            E::NotSupported { .. } | E::NotImplemented => io::ErrorKind::Unsupported,
            E::AlreadyExists { .. } => io::ErrorKind::AlreadyExists,
            // A 4xx other than 429 will not fix itself.
            _ if d.status.is_some_and(|s| (400..500).contains(&s)) => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        (kind, fault(format!("{} ({ep}): {}", self.location(), d.text), None))
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

    /// A conditional PUT (`If-None-Match: *`), trusted: what the store
    /// answers is the outcome.
    fn put_conditional(&self, key: &str, data: &[u8]) -> Result<PutOutcome, StorageError> {
        Ok(match self.put(key, data, PutMode::Create)? {
            Some(meta) => PutOutcome::Created(meta),
            None => PutOutcome::Exists,
        })
    }
}

/// A unique key for one conditional-create probe, at the top of the
/// repository (next to the marker, outside every cluster).
fn probe_key() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("walvault.probe-{}-{nanos}", std::process::id())
}

/// What an `object_store` error says once its chain is read: the HTTP
/// status and S3 error code of a refused request, the transport failure
/// of one that got no answer.
struct Diagnosis {
    status: Option<u16>,
    code: Option<String>,
    http: Option<HttpErrorKind>,
    /// The whole chain's text (URLs and counters included, no secrets:
    /// requests are signed in headers, never in the URL).
    text: String,
    /// The deepest cause's text ("Connection refused (os error 111)").
    innermost: String,
}

impl Diagnosis {
    fn of(e: &object_store::Error) -> Diagnosis {
        let text = e.to_string();
        let mut http = None;
        let mut innermost = text.clone();
        // The whole chain, for markers of transport failures:
        // object_store's HttpError is hidden behind a transparent wrapper,
        // so its kind is read from its causes (reqwest, hyper, io).
        let mut chain = String::new();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(x) = cur {
            if http.is_none()
                && let Some(h) = x.downcast_ref::<HttpError>()
            {
                http = Some(h.kind());
            }
            if http.is_none()
                && let Some(io) = x.downcast_ref::<io::Error>()
            {
                http = match io.kind() {
                    io::ErrorKind::TimedOut => Some(HttpErrorKind::Timeout),
                    io::ErrorKind::ConnectionRefused => Some(HttpErrorKind::Connect),
                    io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof => Some(HttpErrorKind::Request),
                    _ => None,
                };
            }
            innermost = x.to_string();
            chain.push_str(&innermost.to_ascii_lowercase());
            chain.push('\n');
            cur = x.source();
        }
        if http.is_none() {
            http = if chain.contains("timed out") || chain.contains("timeout") {
                Some(HttpErrorKind::Timeout)
            } else if chain.contains("connection refused") || chain.contains("tcp connect error") {
                Some(HttpErrorKind::Connect)
            } else if chain.contains("error sending request")
                || chain.contains("connection closed")
                || chain.contains("connection reset")
                || chain.contains("incomplete message")
                || chain.contains("error reading a body")
            {
                Some(HttpErrorKind::Request)
            } else {
                None
            };
        }
        let status = ["status code: ", "Status code: "]
            .iter()
            .find_map(|m| text.split_once(m))
            .and_then(|(_, rest)| rest.get(..3))
            .and_then(|d| d.parse().ok());
        let code = text
            .split_once("<Code>")
            .and_then(|(_, rest)| rest.split_once("</Code>"))
            .map(|(c, _)| c.trim().to_string())
            .filter(|c| !c.is_empty() && c.len() < 64 && c.bytes().all(|b| b.is_ascii_alphanumeric()));
        Diagnosis { status, code, http, text, innermost }
    }

    fn bucket_missing(&self) -> bool {
        self.code.as_deref() == Some("NoSuchBucket")
    }

    /// The request got no usable answer: a transport failure, a server
    /// error, throttling.
    fn unanswered(&self) -> bool {
        self.http.is_some() || self.status.is_some_and(|s| s >= 500 || s == 429)
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
        if self.conditional_create() == ConditionalCreate::CheckFirst && self.head(key)?.is_some() {
            return Ok(PutOutcome::Exists);
        }
        // Still conditional: a store that honours the header stays atomic.
        self.put_conditional(key, data)
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
                // No answer, or a failing server: asking again (HEAD) would
                // only spend the budget a second time.
                Err(e) if Diagnosis::of(&e).unanswered() => return Err(self.err(key, e)),
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
            Ok(()) => Ok(()),
            Err(e) => match self.err(key, e) {
                StorageError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Creates a unique probe object with a conditional PUT, creates it
    /// again with other bytes, reads it back and deletes it: the store
    /// honours `If-None-Match: *` when the second PUT was refused and the
    /// first bytes are still there. Four requests; the probe object is
    /// deleted even when the probe fails half-way.
    fn probe_conditional_create(&self) -> Result<bool, StorageError> {
        let key = probe_key();
        let (first, second) = (b"walvault conditional-create probe: first".as_slice(), b"second".as_slice());
        let result = (|| {
            if self.put_conditional(&key, first)? == PutOutcome::Exists {
                return Err(StorageError::Io {
                    key: key.clone(),
                    source: io::Error::other("the probe object already existed before it was created"),
                });
            }
            let refused = self.put_conditional(&key, second)? == PutOutcome::Exists;
            let kept = self.get(&key)? == first;
            Ok(refused && kept)
        })();
        let cleanup = self.delete(&key);
        let honoured = result?;
        cleanup?;
        Ok(honoured)
    }

    fn set_conditional_create(&self, mode: ConditionalCreate) {
        self.check_first.store(mode == ConditionalCreate::CheckFirst, Ordering::Relaxed);
    }

    fn conditional_create(&self) -> ConditionalCreate {
        if self.check_first.load(Ordering::Relaxed) { ConditionalCreate::CheckFirst } else { ConditionalCreate::Trust }
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
