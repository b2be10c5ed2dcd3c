//! S3 GETs through presigned URLs, for endpoints that answer with chunked transfer encoding and
//! no `Content-Length` (some S3-compatible gateways and proxies).
//!
//! `object_store` needs `Content-Length` on every GET response (it takes the object's size from
//! it) and fails with `Content-Length Header missing from response` otherwise. A [`Store`] on
//! such an endpoint notices that error on its first GET and from then on reads objects here
//! instead: a URL presigned by `object_store`'s [`Signer`] (SigV4 query authentication, the
//! same credentials chain), fetched with the HTTP client `object_store` itself builds from the
//! same `AWS_*` client options (timeouts, proxy, TLS roots, `AWS_ALLOW_HTTP`) and the store's
//! user agent (`devise/<version> rank/<R>`, see the storage module docs), the body streamed
//! as it arrives. Failures are retried as `object_store` retries a GET (`RetryConfig`): 5xx,
//! 429 and 408 answers, connection errors and timeouts, with the same exponential backoff and
//! jitter, at most `max_retries` retries within `retry_timeout`; a body cut mid-way is
//! re-requested from its byte offset (`Range: bytes=N-`, `If-Match` its ETag) within the same
//! budget.
//!
//! Which stores were switched is remembered for the process ([`Presigned::in_use`]), so the
//! `Content-Length` error costs one request per bucket and the switch is logged once.
//!
//! [`Store`]: super::Store
//! [`Signer`]: object_store::signer::Signer

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use http::header::{CONTENT_RANGE, ETAG, IF_MATCH, RANGE};
use http::{Method, StatusCode};
use object_store::aws::{AmazonS3, AmazonS3ConfigKey};
use object_store::client::{
    HttpClient, HttpConnector, HttpErrorKind, HttpRequestBody, HttpResponse, ReqwestConnector,
};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{BackoffConfig, ClientConfigKey, ClientOptions, RetryConfig};
use rand::Rng;
use url::Url;

/// How long a presigned URL stays valid. Each request (first try, retry, resume) signs a fresh
/// one, so this only has to cover the request's start plus clock skew between us and the server.
const URL_EXPIRY: Duration = Duration::from_secs(3600);

/// Identities ([`Presigned::id`]) of the stores whose GETs go through presigned URLs.
static IN_USE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// What a GET through a presigned URL can end in, before the caller names the object.
pub(super) enum GetError {
    /// 404 from the server.
    NotFound,
    /// Anything else, after retries; the message carries method, URL without its signature,
    /// time spent and retries made.
    Failed(anyhow::Error),
}

/// The presigned-URL GET path of one S3 store. Cheap to clone.
#[derive(Clone)]
pub(super) struct Presigned {
    s3: Arc<AmazonS3>,
    /// The `AWS_*` client options, and the client built from them on first use (only stores
    /// that are switched need one).
    options: ClientOptions,
    http: Arc<OnceLock<HttpClient>>,
    retry: RetryConfig,
    /// `<store scheme>://<bucket>` plus the endpoint setting: which entry of [`IN_USE`] is ours.
    id: String,
}

impl Presigned {
    /// The presigned path for `s3` (built from the environment and `url`, as `cloud_backend`
    /// does), with `retry` as the store's retry policy. `None` when requests go unsigned
    /// (`AWS_SKIP_SIGNATURE`): there is nothing to presign with. Contacts nothing.
    pub(super) fn new(
        s3: Arc<AmazonS3>,
        builder: &object_store::aws::AmazonS3Builder,
        url: &Url,
        retry: RetryConfig,
    ) -> Option<Presigned> {
        let skip = builder
            .get_config_value(&AmazonS3ConfigKey::SkipSignature)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        if skip {
            return None;
        }
        let endpoint = builder
            .get_config_value(&AmazonS3ConfigKey::Endpoint)
            .unwrap_or_default();
        let id = format!("{}|{endpoint}", &url[..url::Position::BeforePath]);
        // The user agent the store's own requests send (`devise/<version> rank/<R>`, see the
        // storage module docs), so that presigned GETs are attributed like the others.
        let mut options = client_options_from_env();
        if let Some(agent) =
            builder.get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::UserAgent))
        {
            options = options.with_config(ClientConfigKey::UserAgent, agent);
        }
        Some(Presigned {
            s3,
            options,
            http: Arc::new(OnceLock::new()),
            retry,
            id,
        })
    }

    /// The HTTP client `object_store` builds from the same options (timeouts, proxy, TLS roots,
    /// `AWS_ALLOW_HTTP`), made on first use. Errors: options it cannot build a client from
    /// (`object_store` would have refused them when the store was opened).
    fn http(&self) -> anyhow::Result<&HttpClient> {
        if let Some(client) = self.http.get() {
            return Ok(client);
        }
        let client = ReqwestConnector::default()
            .connect(&self.options)
            .context("building the HTTP client for presigned GETs")?;
        Ok(self.http.get_or_init(|| client))
    }

    /// Whether this store's GETs already go through presigned URLs (in this process).
    pub(super) fn in_use(&self) -> bool {
        IN_USE
            .lock()
            .map(|set| set.contains(&self.id))
            .unwrap_or(false)
    }

    /// Switches this store's GETs to presigned URLs for the rest of the process, logging it at
    /// warn (once per store) with the endpoint's origin and the object `url` that showed it.
    pub(super) async fn switch(&self, key: &ObjectPath, url: &str) {
        let newly = IN_USE
            .lock()
            .map(|mut set| set.insert(self.id.clone()))
            .unwrap_or(false);
        if newly {
            let endpoint = match self.s3.signed_url(Method::GET, key, URL_EXPIRY).await {
                Ok(u) => u.origin().ascii_serialization(),
                Err(_) => "the S3 endpoint".to_string(),
            };
            tracing::warn!(
                "{endpoint} answered the GET of {url} without Content-Length (chunked transfer \
                 encoding); this bucket's objects are now read through presigned URLs"
            );
        }
    }

    /// GETs `key` and returns its body as a stream of chunks as they arrive (nothing buffered
    /// beyond what the caller holds). A body cut mid-way is resumed from its offset (see the
    /// module docs); an error the retries could not cure ends the stream.
    pub(super) async fn get(
        &self,
        key: &ObjectPath,
    ) -> Result<BoxStream<'static, anyhow::Result<Bytes>>, GetError> {
        let mut attempts = Attempts::new(&self.retry);
        let response = self.request(key, 0, None, &mut attempts).await?;
        let etag = response
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let state = Body {
            get: self.clone(),
            key: key.clone(),
            etag,
            offset: 0,
            attempts,
            body: response.into_body().bytes_stream(),
        };
        Ok(futures::stream::try_unfold(state, Body::next).boxed())
    }

    /// One GET, retried by the retry policy: from byte `from` (a `Range` request, answered 206
    /// at that offset) and only while the object's ETag is `if_match`, when given.
    async fn request(
        &self,
        key: &ObjectPath,
        from: u64,
        if_match: Option<&str>,
        attempts: &mut Attempts,
    ) -> Result<HttpResponse, GetError> {
        loop {
            let url = self
                .s3
                .signed_url(Method::GET, key, URL_EXPIRY)
                .await
                .map_err(|e| GetError::Failed(anyhow!(e).context("presigning a GET")))?;
            // Errors show the URL without its query: the signature and credential scope stay out
            // of logs.
            let mut shown = url.clone();
            shown.set_query(None);
            let mut request = http::Request::builder()
                .method(Method::GET)
                .uri(url.as_str());
            if from > 0 {
                request = request.header(RANGE, format!("bytes={from}-"));
            }
            if let Some(etag) = if_match {
                request = request.header(IF_MATCH, etag);
            }
            let request = request
                .body(HttpRequestBody::empty())
                .map_err(|e| GetError::Failed(anyhow!("GET {shown}: {e}")))?;
            let http = self.http().map_err(GetError::Failed)?;
            let failure = match http.execute(request).await {
                Ok(response) if response.status().is_success() => {
                    return check_range(response, from, if_match)
                        .map_err(|e| GetError::Failed(anyhow!("GET {shown}: {e}")));
                }
                Ok(response) => {
                    let status = response.status();
                    if status == StatusCode::NOT_FOUND {
                        return Err(GetError::NotFound);
                    }
                    let retryable = status.is_server_error()
                        || status == StatusCode::TOO_MANY_REQUESTS
                        || status == StatusCode::REQUEST_TIMEOUT;
                    if !retryable || attempts.exhausted() {
                        let body = if status.is_client_error() {
                            response.into_body().bytes().await.ok()
                        } else {
                            None
                        };
                        let body = body.map(|b| String::from_utf8_lossy(&b).into_owned());
                        return Err(GetError::Failed(anyhow!(
                            "GET {shown} {}: server returned {status}: {}",
                            attempts.describe(),
                            body.as_deref().unwrap_or("")
                        )));
                    }
                    format!("status {status}")
                }
                Err(e) => {
                    // As object_store: a GET is safe, so timeouts and interrupted requests are
                    // retried too; decode and unknown errors are not.
                    let retryable = matches!(
                        e.kind(),
                        HttpErrorKind::Connect
                            | HttpErrorKind::Request
                            | HttpErrorKind::Timeout
                            | HttpErrorKind::Interrupted
                    );
                    if !retryable || attempts.exhausted() {
                        return Err(GetError::Failed(anyhow!(
                            "GET {shown} {}: {e}",
                            attempts.describe()
                        )));
                    }
                    format!("transport error of kind {:?}: {e}", e.kind())
                }
            };
            let sleep = attempts.backoff();
            tracing::info!(
                "GET {shown}: {failure}, backing off for {:.2} s, retry {} of {}",
                sleep.as_secs_f32(),
                attempts.retries,
                attempts.max_retries
            );
            tokio::time::sleep(sleep).await;
        }
    }
}

/// `object_store`'s client options as `AmazonS3Builder::from_env` reads them: every `AWS_*`
/// variable that names a client option (`AWS_ALLOW_HTTP`, `AWS_TIMEOUT`, `AWS_PROXY_URL`, ...).
fn client_options_from_env() -> ClientOptions {
    let mut options = ClientOptions::default();
    for (key, value) in std::env::vars_os() {
        let (Some(key), Some(value)) = (key.to_str(), value.to_str()) else {
            continue;
        };
        if !key.starts_with("AWS_") {
            continue;
        }
        if let Ok(AmazonS3ConfigKey::Client(option)) = key.to_ascii_lowercase().parse() {
            options = options.with_config(option, value);
        }
    }
    options
}

/// A successful answer to a GET from byte `from`: for a resumed read (`from > 0`) the server
/// must answer 206 at exactly that offset, with the same ETag (the object did not change).
fn check_range(
    response: HttpResponse,
    from: u64,
    if_match: Option<&str>,
) -> Result<HttpResponse, String> {
    if from == 0 {
        return Ok(response);
    }
    if response.status() != StatusCode::PARTIAL_CONTENT {
        return Err(format!(
            "asked for bytes {from}- to resume a cut download, got {} instead of 206",
            response.status()
        ));
    }
    let range = response
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let start = range
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('-'))
        .and_then(|(start, _)| start.trim().parse::<u64>().ok());
    if start != Some(from) {
        return Err(format!(
            "asked for bytes {from}- to resume a cut download, got Content-Range {range:?}"
        ));
    }
    let etag = response.headers().get(ETAG).and_then(|v| v.to_str().ok());
    if etag != if_match {
        return Err(format!(
            "the object changed while it was read (ETag {} before, {} now)",
            if_match.unwrap_or("none"),
            etag.unwrap_or("none")
        ));
    }
    Ok(response)
}

/// The state of a streamed body: where it is, and what resuming it needs.
struct Body {
    get: Presigned,
    key: ObjectPath,
    /// The object's ETag from the first answer; without one a cut body cannot be resumed safely.
    etag: Option<String>,
    /// Bytes of the object delivered so far.
    offset: u64,
    attempts: Attempts,
    body: BoxStream<'static, Result<Bytes, object_store::client::HttpError>>,
}

impl Body {
    /// The next chunk, resuming the body at its offset when the connection fails mid-way.
    async fn next(mut self) -> anyhow::Result<Option<(Bytes, Body)>> {
        loop {
            match self.body.next().await {
                None => return Ok(None),
                Some(Ok(bytes)) => {
                    self.offset += bytes.len() as u64;
                    return Ok(Some((bytes, self)));
                }
                Some(Err(e)) => {
                    let Some(etag) = self.etag.clone() else {
                        return Err(anyhow!("{e} (no ETag in the answer, so not resumed)"));
                    };
                    if self.attempts.exhausted() {
                        return Err(anyhow!(
                            "{e} at byte {} {}",
                            self.offset,
                            self.attempts.describe()
                        ));
                    }
                    let sleep = self.attempts.backoff();
                    tracing::info!(
                        "reading the body of {}: {e}; resuming at byte {} in {:.2} s",
                        self.key,
                        self.offset,
                        sleep.as_secs_f32()
                    );
                    tokio::time::sleep(sleep).await;
                    let response = match self
                        .get
                        .request(&self.key, self.offset, Some(&etag), &mut self.attempts)
                        .await
                    {
                        Ok(r) => r,
                        Err(GetError::NotFound) => {
                            return Err(anyhow!("deleted while it was read ({e})"))
                        }
                        Err(GetError::Failed(f)) => {
                            return Err(f.context(format!("resuming at byte {}", self.offset)))
                        }
                    };
                    self.body = response.into_body().bytes_stream();
                }
            }
        }
    }
}

/// The retry budget of one GET (its first request, retries and resumes together), as
/// `object_store`'s `RetryContext`: at most `max_retries` retries, none started after
/// `retry_timeout`; waits grow by `base` from `init_backoff`, drawn at random up to the grown
/// value and capped at `max_backoff` (`object_store`'s `Backoff`).
struct Attempts {
    retries: usize,
    max_retries: usize,
    retry_timeout: Duration,
    start: Instant,
    init_backoff_secs: f64,
    next_backoff_secs: f64,
    max_backoff_secs: f64,
    base: f64,
}

impl Attempts {
    fn new(config: &RetryConfig) -> Attempts {
        let BackoffConfig {
            init_backoff,
            max_backoff,
            base,
        } = &config.backoff;
        Attempts {
            retries: 0,
            max_retries: config.max_retries,
            retry_timeout: config.retry_timeout,
            start: Instant::now(),
            init_backoff_secs: init_backoff.as_secs_f64(),
            next_backoff_secs: init_backoff.as_secs_f64(),
            max_backoff_secs: max_backoff.as_secs_f64(),
            base: *base,
        }
    }

    fn exhausted(&self) -> bool {
        self.retries >= self.max_retries || self.start.elapsed() > self.retry_timeout
    }

    /// Counts a retry and returns how long to wait before it.
    fn backoff(&mut self) -> Duration {
        self.retries += 1;
        let high = self.next_backoff_secs * self.base;
        let drawn = if high > self.init_backoff_secs {
            rand::rng().random_range(self.init_backoff_secs..high)
        } else {
            self.init_backoff_secs
        };
        let wait = std::mem::replace(
            &mut self.next_backoff_secs,
            self.max_backoff_secs.min(drawn),
        );
        Duration::from_secs_f64(wait.max(0.0))
    }

    /// "in 1.2s, after 3 retries (max_retries 10, retry_timeout 180s)", for error messages.
    fn describe(&self) -> String {
        format!(
            "in {:.1?}, after {} retries (max_retries {}, retry_timeout {:?})",
            self.start.elapsed(),
            self.retries,
            self.max_retries,
            self.retry_timeout
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_from_init_to_max_as_object_store_does() {
        let config = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(15),
                base: 2.0,
            },
            max_retries: 10,
            retry_timeout: Duration::from_secs(180),
        };
        let mut attempts = Attempts::new(&config);
        // The first wait is init_backoff; each later one lies in [init, min(max, previous bound)].
        assert_eq!(attempts.backoff(), Duration::from_millis(100));
        let mut bound: f64 = 0.1 * 2.0;
        for _ in 1..10 {
            assert!(!attempts.exhausted());
            let wait = attempts.backoff().as_secs_f64();
            assert!(
                (0.1..=bound.min(15.0) + 1e-9).contains(&wait),
                "{wait} > {bound}"
            );
            bound = bound.min(15.0) * 2.0;
        }
        assert_eq!(attempts.retries, 10);
        assert!(attempts.exhausted(), "10 retries is the budget");
        assert!(attempts.describe().contains("after 10 retries"));
    }
}
