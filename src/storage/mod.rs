//! Object storage behind one small blocking API.
//!
//! A [`Store`] is a "directory" URL: a plain path (`runs/x`, `/data/shards`), a `file://` URL,
//! `memory://` (tests), or an object store: `s3://bucket/prefix` (also `s3a://`),
//! `gs://bucket/prefix`, `az://container/prefix` (also `abfs[s]://`, `azure://`), and
//! `http(s)://host/prefix` (WebDAV-style HTTP stores; read-only servers work for reading).
//! Locations stay URL strings end to end (`Store::child_url`), never `PathBuf`s.
//!
//! Credentials, region, endpoint and path-style come only from the environment and the
//! instance-metadata chains, through the `object_store` builders' `from_env`: `AWS_*` (e.g.
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`,
//! `AWS_ALLOW_HTTP`, `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`), `GOOGLE_*`, `AZURE_*`; never from the
//! configuration file, and they are never logged (only the URL is). Requests are retried with
//! exponential backoff (`object_store`'s retry policy: throttling such as 503 SlowDown and 429,
//! server errors and cut connections; up to 10 retries within 3 minutes).
//!
//! S3 requests carry the HTTP `User-Agent` `devise/<version>`, plus ` rank/<R>` when the
//! environment variable `RANK` is an integer (`devise-launch` sets it for each worker, as
//! torchrun and most SLURM setups do): `devise/0.1.0 rank/3`. S3 server access logs record it,
//! so they attribute every GET to the rank that made it. A user agent set with
//! `AWS_USER_AGENT` is kept, first: `my-site devise/0.1.0 rank/3`.
//!
//! Some S3-compatible gateways and proxies answer GETs with chunked transfer encoding and no
//! `Content-Length`, which `object_store` rejects. An S3 store whose endpoint does that is
//! noticed on its first GET and from then on reads objects through presigned URLs, streamed, with
//! the same retry policy (see `presigned`); the switch is logged once at warn. Everything else
//! (other operations, other stores) goes through `object_store`.
//!
//! Every call blocks the calling thread on one shared tokio runtime ([`runtime`]). Do not call
//! it from inside an async task (tokio panics on nested `block_on`); the trainer is synchronous.
//!
//! Names passed to the methods are `/`-separated keys relative to the store's URL (`"a/b.tar"`).
//! They must not contain empty, `.` or `..` segments (`object_store::path::Path::parse` rules).

mod presigned;
pub mod tensors;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{GetResult, ObjectStore, PutPayload};
use url::Url;

use presigned::{GetError, Presigned};

/// A cloud store's client, and for S3 its presigned-URL GET path.
type Client = (Arc<dyn ObjectStore>, Option<Presigned>);

/// The cloud clients built so far in this process, by [`client_key`]. At most
/// [`MAX_CLIENTS`]; the oldest is dropped first.
static CLIENTS: Mutex<Vec<(String, Client)>> = Mutex::new(Vec::new());
const MAX_CLIENTS: usize = 16;

/// What a cloud client is built from: the URL's scheme and authority (bucket, container or
/// host; the path is not part of the client) and the whole environment (the builders read
/// credentials, endpoint and client options from it, and the user agent reads `RANK`).
fn client_key(url: &Url) -> String {
    let mut env: Vec<String> = std::env::vars_os()
        .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
        .collect();
    env.sort();
    format!("{}\n{}", &url[..url::Position::BeforePath], env.join("\n"))
}

/// The backend and base path of a non-local URL: `memory://` (a fresh store per call), or a
/// cloud store configured from the environment (see the module docs), plus, for S3, the
/// presigned-URL GET path used when the endpoint answers without `Content-Length`.
///
/// A cloud client is built once per bucket and environment and shared by every store opened on
/// it in this process (as `object_store` intends): its connection pool is reused, and the
/// system's TLS roots are loaded once, not at every `Store::open` (building an S3 client reads
/// every file of `/etc/ssl/certs`: 147 files, 17-26 ms under strace on a 2-core VM, which the
/// training stream paid before its first GET). Errors name what is wrong (unknown scheme,
/// missing bucket, bad environment value) without echoing credentials.
fn cloud_backend(url: &Url) -> Result<(Arc<dyn ObjectStore>, ObjectPath, Option<Presigned>)> {
    use object_store::ObjectStoreScheme as Scheme;
    let (scheme, path) = Scheme::parse(url).map_err(|e| anyhow!("{e}"))?;
    if scheme == Scheme::Memory {
        return Ok((Arc::new(object_store::memory::InMemory::new()), path, None));
    }
    let key = client_key(url);
    let cached = CLIENTS.lock().ok().and_then(|clients| {
        clients
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, c)| c.clone())
    });
    let (backend, presigned) = match cached {
        Some(client) => client,
        None => {
            let client = cloud_client(scheme, url)?;
            if let Ok(mut clients) = CLIENTS.lock() {
                if clients.len() == MAX_CLIENTS {
                    clients.remove(0);
                }
                clients.push((key, client.clone()));
            }
            client
        }
    };
    Ok((backend, path, presigned))
}

/// A new client for the cloud store `url` (of `scheme`), configured from the environment.
fn cloud_client(scheme: object_store::ObjectStoreScheme, url: &Url) -> Result<Client> {
    use object_store::ObjectStoreScheme as Scheme;
    let retry = object_store::RetryConfig::default();
    let mut presigned = None;
    let backend: Arc<dyn ObjectStore> = match scheme {
        Scheme::AmazonS3 => {
            let builder = object_store::aws::AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .with_retry(retry.clone());
            let builder = with_user_agent(builder, std::env::var("RANK").ok().as_deref());
            let s3 = Arc::new(builder.clone().build()?);
            presigned = Presigned::new(s3.clone(), &builder, url, retry);
            s3
        }
        Scheme::GoogleCloudStorage => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry)
                .build()?,
        ),
        Scheme::MicrosoftAzure => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry)
                .build()?,
        ),
        Scheme::Http => Arc::new(
            object_store::http::HttpBuilder::new()
                .with_url(&url[..url::Position::BeforePath])
                .with_retry(retry)
                .build()?,
        ),
        Scheme::Local => bail!("file:// URLs are handled as local directories"),
        other => bail!("unsupported storage scheme {other:?}"),
    };
    Ok((backend, presigned))
}

/// `builder` with the HTTP `User-Agent` of the module docs: [`user_agent`] of the one it read
/// from the environment (`AWS_USER_AGENT`, if any) and of `rank` (the `RANK` variable). Only that
/// client option is set; every other one `from_env` read stays.
fn with_user_agent(
    builder: object_store::aws::AmazonS3Builder,
    rank: Option<&str>,
) -> object_store::aws::AmazonS3Builder {
    use object_store::aws::AmazonS3ConfigKey;
    use object_store::ClientConfigKey;
    let key = AmazonS3ConfigKey::Client(ClientConfigKey::UserAgent);
    let agent = user_agent(builder.get_config_value(&key).as_deref(), rank);
    builder.with_config(key, agent)
}

/// `devise/<version>`, plus ` rank/<R>` when `rank` (the `RANK` variable) is an integer, after
/// `from_env` (a user agent the environment already set, kept first).
fn user_agent(from_env: Option<&str>, rank: Option<&str>) -> String {
    let mut agent = String::new();
    if let Some(first) = from_env.map(str::trim).filter(|a| !a.is_empty()) {
        agent.push_str(first);
        agent.push(' ');
    }
    agent.push_str(concat!("devise/", env!("CARGO_PKG_VERSION")));
    if let Some(rank) = rank.and_then(|r| r.trim().parse::<u64>().ok()) {
        agent.push_str(&format!(" rank/{rank}"));
    }
    agent
}

/// The process-wide tokio runtime that every blocking [`Store`] call runs on (2 worker threads,
/// I/O + time drivers enabled). Created on first use; never shut down.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("devise-storage")
            .enable_all()
            .build()
            .expect("creating the storage tokio runtime")
    })
}

/// A "directory" in an object store, addressed by a URL string.
///
/// Cheap to clone (the backend is shared). Objects are written whole and atomically
/// ([`Store::put`]); readers never observe a half-written object.
#[derive(Clone)]
pub struct Store {
    /// What the caller passed, minus trailing `/` (so `child_url` never doubles slashes).
    url: String,
    /// `Some(dir)` when the store is the local file system.
    local: Option<PathBuf>,
    backend: Arc<dyn ObjectStore>,
    /// Prefix of every object inside `backend` (empty for local stores, which are rooted at
    /// the directory itself).
    base: ObjectPath,
    /// S3 stores: GETs through presigned URLs, taken when the endpoint answers without
    /// `Content-Length` (see the module docs).
    presigned: Option<Presigned>,
}

/// An object whose GET has been answered: by `object_store`, or through a presigned URL.
enum Answer {
    Store(GetResult),
    Presigned(BoxStream<'static, Result<Bytes>>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

impl Store {
    /// Opens the directory `url`: a plain path (relative to the current directory or absolute),
    /// `file:///abs/dir`, or `memory://` (a fresh, empty in-process store per call).
    ///
    /// A local directory is created (with parents) if missing.
    ///
    /// Errors: unparseable URL, a scheme whose `object_store` feature is not compiled in, a local
    /// directory that cannot be created.
    pub fn open(url: &str) -> Result<Store> {
        Self::open_inner(url, true)
    }

    /// Like [`Store::open`], but a missing local directory is an error instead of being created
    /// (readers use this so a typo in a path does not leave an empty directory behind).
    pub fn open_existing(url: &str) -> Result<Store> {
        Self::open_inner(url, false)
    }

    fn open_inner(url: &str, create: bool) -> Result<Store> {
        let trimmed = url.trim();
        if trimmed.is_empty() {
            bail!("empty storage URL");
        }
        // Drop trailing '/' unless that would destroy the URL ("/", "memory://", "file:///").
        let stripped = trimmed.trim_end_matches('/');
        let keep = if stripped.is_empty() || stripped.ends_with(':') {
            trimmed
        } else {
            stripped
        };
        match local_dir_of(trimmed)? {
            Some(dir) => {
                if create {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating directory {}", dir.display()))?;
                } else if !dir.is_dir() {
                    bail!("{url}: no such directory");
                }
                let backend = LocalFileSystem::new_with_prefix(&dir)
                    .with_context(|| format!("opening local store {url}"))?;
                Ok(Store {
                    url: keep.to_string(),
                    local: Some(dir),
                    backend: Arc::new(backend),
                    base: ObjectPath::default(),
                    presigned: None,
                })
            }
            None => {
                let parsed = Url::parse(trimmed).with_context(|| format!("parsing URL {url}"))?;
                let (backend, base, presigned) = cloud_backend(&parsed)
                    .with_context(|| format!("opening object store {url}"))?;
                Ok(Store {
                    url: keep.to_string(),
                    local: None,
                    backend,
                    base,
                    presigned,
                })
            }
        }
    }

    /// The URL this store was opened with (trailing `/` removed).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of object `name` inside this store (`<url>/<name>`); it can be passed to
    /// [`Store::open`] again when `name` is a "directory".
    pub fn child_url(&self, name: &str) -> String {
        let name = name.trim_start_matches('/');
        if self.url.ends_with('/') {
            format!("{}{name}", self.url)
        } else {
            format!("{}/{name}", self.url)
        }
    }

    /// The local directory behind this store: `Some` for plain paths and `file://` URLs,
    /// `None` for remote and in-memory stores.
    pub fn local_path(&self) -> Option<PathBuf> {
        self.local.clone()
    }

    fn key(&self, name: &str) -> Result<ObjectPath> {
        let name = name.trim_matches('/');
        let full = if self.base.as_ref().is_empty() {
            name.to_string()
        } else if name.is_empty() {
            self.base.as_ref().to_string()
        } else {
            format!("{}/{name}", self.base.as_ref())
        };
        ObjectPath::parse(&full).map_err(|e| anyhow!("invalid object name {name:?}: {e}"))
    }

    /// Sends the GET of object `name` and waits for the answer's headers: through
    /// `object_store`, or through a presigned URL when this S3 store's endpoint answers without
    /// `Content-Length` (noticed here on the first such answer). Errors (missing object,
    /// request failures after retries) name the full URL.
    fn answer(&self, name: &str) -> Result<Answer> {
        let key = self.key(name)?;
        let url = self.child_url(name);
        let backend = self.backend.clone();
        let presigned = self.presigned.clone();
        let shown = url.clone();
        let answer = runtime().block_on(async move {
            if let Some(p) = presigned.as_ref().filter(|p| p.in_use()) {
                return p.get(&key).await.map(Answer::Presigned);
            }
            match backend.get(&key).await {
                Ok(result) => Ok(Answer::Store(result)),
                Err(object_store::Error::NotFound { .. }) => Err(GetError::NotFound),
                Err(e) => match presigned {
                    Some(p) if lacks_content_length(&e) => {
                        p.switch(&key, &shown).await;
                        p.get(&key).await.map(Answer::Presigned)
                    }
                    _ => Err(GetError::Failed(e.into())),
                },
            }
        });
        match answer {
            Ok(answer) => Ok(answer),
            // object_store's NotFound message already quotes the OS error it wraps; one line is enough.
            Err(GetError::NotFound) => bail!("{url}: not found"),
            Err(GetError::Failed(e)) => Err(e.context(format!("reading {url}"))),
        }
    }

    /// Reads the whole object `name`. Errors (missing object, I/O) name the full URL.
    pub fn get(&self, name: &str) -> Result<Bytes> {
        let read = match self.answer(name)? {
            Answer::Store(result) => runtime()
                .block_on(result.bytes())
                .map_err(anyhow::Error::from),
            Answer::Presigned(stream) => runtime()
                .block_on(
                    stream.try_fold(BytesMut::new(), |mut all, chunk| async move {
                        all.extend_from_slice(&chunk);
                        Ok(all)
                    }),
                )
                .map(BytesMut::freeze),
        };
        read.with_context(|| format!("reading {}", self.child_url(name)))
    }

    /// Opens object `name` for streaming: bytes arrive as they download, so a multi-GB shard
    /// is parsed while it is still coming in and never held whole. Local stores return the
    /// file (buffered). Remote reads go through `object_store`'s GET stream (or, on an S3
    /// endpoint that answers without `Content-Length`, a presigned URL's, with the same policy),
    /// which retries a connection cut mid-body by re-requesting the remaining byte range
    /// (`Range: bytes=N-`, guarded by the object's ETag) with backoff; an error the retries could
    /// not cure comes out of `read` as an `io::Error` naming the URL.
    ///
    /// Errors (here): missing object (named by URL), request failures after retries.
    pub fn open_read(&self, name: &str) -> Result<Box<dyn std::io::Read + Send>> {
        if let Some(dir) = &self.local {
            // The name checked and normalised as for every other method (no `..`, no empty
            // segment, no trailing `/`), so it names the file `put` wrote.
            let path = dir.join(self.key(name)?.as_ref());
            let file = std::fs::File::open(&path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    anyhow!("{}: not found", self.child_url(name))
                } else {
                    anyhow!(e).context(format!("opening {}", self.child_url(name)))
                }
            })?;
            return Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, file)));
        }
        let stream = match self.answer(name)? {
            Answer::Store(result) => result.into_stream().map_err(anyhow::Error::from).boxed(),
            Answer::Presigned(stream) => stream,
        };
        // The download runs ahead in a task on the storage runtime, pipelined with parsing;
        // at most STREAM_AHEAD_CHUNKS body chunks wait for the reader.
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_AHEAD_CHUNKS);
        runtime().spawn(async move {
            let mut stream = stream;
            while let Some(chunk) = stream.next().await {
                let failed = chunk.is_err();
                if tx.send(chunk).await.is_err() || failed {
                    break; // reader dropped, or the error is delivered
                }
            }
        });
        Ok(Box::new(StreamRead {
            url: self.child_url(name),
            rx,
            chunk: Bytes::new(),
        }))
    }

    /// Writes the object `name` (replacing any previous one). Atomic per object: local stores
    /// write a temporary file and rename it; cloud stores publish on upload completion.
    /// Errors name the full URL.
    pub fn put(&self, name: &str, data: Bytes) -> Result<()> {
        let key = self.key(name)?;
        let backend = self.backend.clone();
        runtime()
            .block_on(async move { backend.put(&key, PutPayload::from(data)).await })
            .map(|_| ())
            .with_context(|| format!("writing {}", self.child_url(name)))
    }

    /// Every object whose relative name starts with `prefix` (a plain string prefix, so `"train-"`
    /// matches `train-000000.tar`; `""` lists everything, recursively), as
    /// `(relative name, size in bytes)` sorted by name. A missing directory lists as empty.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let prefix = prefix.trim_start_matches('/');
        // object_store prefixes match whole path segments; list the directory part and filter
        // the rest as a string.
        let dir = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let dir_key = self.key(dir)?;
        let backend = self.backend.clone();
        let listed: Vec<object_store::ObjectMeta> = runtime()
            .block_on(async move {
                let root = if dir_key.as_ref().is_empty() {
                    None
                } else {
                    Some(&dir_key)
                };
                backend.list(root).try_collect().await
            })
            .with_context(|| format!("listing {}", self.child_url(prefix)))?;
        let base = self.base.as_ref();
        let mut out: Vec<(String, u64)> = listed
            .into_iter()
            .filter_map(|meta| {
                let loc = meta.location.as_ref();
                let rel = if base.is_empty() {
                    loc
                } else {
                    loc.strip_prefix(base)?.strip_prefix('/')?
                };
                rel.starts_with(prefix)
                    .then(|| (rel.to_string(), meta.size))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Whether object `name` exists. Errors only on I/O failures other than "not found".
    pub fn exists(&self, name: &str) -> Result<bool> {
        let key = self.key(name)?;
        let backend = self.backend.clone();
        match runtime().block_on(async move { backend.head(&key).await }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("checking {}", self.child_url(name))),
        }
    }

    /// Deletes object `name`. Idempotent: deleting a missing object is not an error (as on S3).
    pub fn delete(&self, name: &str) -> Result<()> {
        let key = self.key(name)?;
        let backend = self.backend.clone();
        match runtime().block_on(async move { backend.delete(&key).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting {}", self.child_url(name))),
        }
    }
}

/// `Some(absolute dir)` when `url` names the local file system (plain path or `file://`).
fn local_dir_of(url: &str) -> Result<Option<PathBuf>> {
    let is_url = url.contains("://");
    if !is_url {
        let p = PathBuf::from(url);
        let abs = if p.is_absolute() {
            p
        } else {
            std::env::current_dir()
                .context("reading the current directory")?
                .join(p)
        };
        return Ok(Some(abs));
    }
    let parsed = Url::parse(url).with_context(|| format!("parsing URL {url}"))?;
    if parsed.scheme() == "file" {
        let p = parsed
            .to_file_path()
            .map_err(|()| anyhow!("{url}: not a local file URL (host part present?)"))?;
        return Ok(Some(p));
    }
    Ok(None)
}

/// Whether `e` is `object_store`'s refusal of a GET answer without `Content-Length` (its
/// message is the only mark it has: the error type carrying it is private).
fn lacks_content_length(e: &object_store::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = source {
        if err.to_string().contains("Content-Length Header missing") {
            return true;
        }
        source = err.source();
    }
    false
}

/// Body chunks (typically 8-64 KiB each) a streamed read may buffer ahead of its reader.
const STREAM_AHEAD_CHUNKS: usize = 64;

/// A blocking [`std::io::Read`] over an object's GET byte stream, fed by a download task (see
/// [`Store::open_read`]).
struct StreamRead {
    url: String,
    rx: tokio::sync::mpsc::Receiver<Result<Bytes>>,
    /// The rest of the last chunk received.
    chunk: Bytes,
}

impl std::io::Read for StreamRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(bytes)) => self.chunk = bytes,
                Some(Err(e)) => {
                    return Err(std::io::Error::other(format!(
                        "reading {}: {e:#}",
                        self.url
                    )))
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        bytes::Buf::advance(&mut self.chunk, n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_urls_open_from_the_environment_and_bad_ones_are_errors() {
        // Builders only read the environment and validate the URL; nothing is contacted.
        for ok in [
            "s3://bucket/prefix",
            "gs://bucket/prefix",
            "https://host/dir",
        ] {
            let store = Store::open(ok).unwrap_or_else(|e| panic!("{ok}: {e:#}"));
            assert_eq!(store.url(), ok);
            assert_eq!(store.child_url("a.tar"), format!("{ok}/a.tar"));
            assert!(store.local_path().is_none());
        }
        for bad in ["ftp://host/x", "s3://"] {
            let e = Store::open(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} should fail"));
            assert!(
                format!("{e:#}").contains(bad),
                "the error names the URL: {e:#}"
            );
        }
        // Azure needs its account from the environment; without it, a clear error.
        if std::env::var_os("AZURE_STORAGE_ACCOUNT_NAME").is_none() {
            let e = format!("{:#}", Store::open("az://container/p").err().unwrap());
            assert!(
                e.contains("az://container/p") && e.contains("Account"),
                "{e}"
            );
        }
    }

    #[test]
    fn stores_on_one_bucket_share_one_client() {
        // Clients are built, never used: nothing is contacted.
        let a = Store::open("s3://shared-client-bucket/a").unwrap();
        let b = Store::open("s3://shared-client-bucket/b/c/").unwrap();
        let other = Store::open("s3://other-client-bucket/a").unwrap();
        assert!(
            Arc::ptr_eq(&a.backend, &b.backend),
            "one bucket, one client"
        );
        assert!(!Arc::ptr_eq(&a.backend, &other.backend));
        // Each store keeps its own prefix.
        assert_eq!(a.key("x.tar").unwrap().as_ref(), "a/x.tar");
        assert_eq!(b.key("x.tar").unwrap().as_ref(), "b/c/x.tar");
        // memory:// stays a fresh store per call.
        let (m1, m2) = (
            Store::open("memory://").unwrap(),
            Store::open("memory://").unwrap(),
        );
        assert!(!Arc::ptr_eq(&m1.backend, &m2.backend));
        // The key holds the bucket and the environment the builders read, not the path.
        let key = client_key(&Url::parse("s3://shared-client-bucket/a/b").unwrap());
        assert!(key.starts_with("s3://shared-client-bucket\n"), "{key}");
        assert!(!key.contains("/a/b"));
        assert!(
            key.contains("\nPATH="),
            "the environment is part of the key"
        );
    }

    #[test]
    fn s3_requests_name_devise_and_the_rank() {
        let v = env!("CARGO_PKG_VERSION");
        assert_eq!(user_agent(None, None), format!("devise/{v}"));
        assert_eq!(user_agent(None, Some("3")), format!("devise/{v} rank/3"));
        assert_eq!(
            user_agent(Some(""), Some(" 12 ")),
            format!("devise/{v} rank/12")
        );
        for not_a_rank in ["", "x", "-1", "1.5"] {
            assert_eq!(user_agent(None, Some(not_a_rank)), format!("devise/{v}"));
        }
        assert_eq!(
            user_agent(Some("site/2"), Some("0")),
            format!("site/2 devise/{v} rank/0")
        );
        // On the builder: only the user agent changes, the other client options stay.
        use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
        use object_store::ClientConfigKey;
        let builder = AmazonS3Builder::new()
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp),
                "true",
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ProxyUrl),
                "http://proxy:3128",
            );
        let builder = with_user_agent(builder, Some("5"));
        let get = |k| builder.get_config_value(&AmazonS3ConfigKey::Client(k));
        assert_eq!(
            get(ClientConfigKey::UserAgent),
            Some(format!("devise/{v} rank/5"))
        );
        assert_eq!(get(ClientConfigKey::AllowHttp).as_deref(), Some("true"));
        assert_eq!(
            get(ClientConfigKey::ProxyUrl).as_deref(),
            Some("http://proxy:3128")
        );
        let twice = with_user_agent(
            AmazonS3Builder::new().with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::UserAgent),
                "site/2",
            ),
            None,
        );
        assert_eq!(
            twice.get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::UserAgent)),
            Some(format!("site/2 devise/{v}"))
        );
    }

    #[test]
    fn local_roundtrip_list_exists_delete() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("new/sub");
        let store = Store::open(root.to_str().unwrap()).unwrap();
        assert!(root.is_dir(), "open creates the directory");
        assert_eq!(store.local_path().unwrap(), root);
        store.put("b.txt", Bytes::from_static(b"bee")).unwrap();
        store.put("a/x.bin", Bytes::from_static(b"12345")).unwrap();
        store.put("train-1.tar", Bytes::from_static(b"t")).unwrap();
        assert_eq!(&store.get("a/x.bin").unwrap()[..], b"12345");
        assert_eq!(
            store.list("").unwrap(),
            vec![
                ("a/x.bin".to_string(), 5),
                ("b.txt".to_string(), 3),
                ("train-1.tar".to_string(), 1)
            ]
        );
        assert_eq!(
            store.list("train-").unwrap(),
            vec![("train-1.tar".to_string(), 1)]
        );
        assert_eq!(store.list("a/").unwrap().len(), 1);
        assert_eq!(store.list("a/x").unwrap().len(), 1);
        assert!(store.list("zzz/").unwrap().is_empty());
        assert!(store.exists("b.txt").unwrap());
        assert!(!store.exists("nope").unwrap());
        store.delete("b.txt").unwrap();
        store.delete("b.txt").unwrap();
        assert!(!store.exists("b.txt").unwrap());
        // no temporary files are left behind by put
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn file_url_and_child_url() {
        let dir = tempfile::tempdir().unwrap();
        let url = Url::from_directory_path(dir.path()).unwrap().to_string();
        assert!(url.ends_with('/'));
        let store = Store::open(&url).unwrap();
        assert_eq!(store.url(), url.trim_end_matches('/'));
        store.put("m.json", Bytes::from_static(b"{}")).unwrap();
        assert!(dir.path().join("m.json").is_file());
        let child = store.child_url("m.json");
        assert!(
            child.starts_with("file:///") && child.ends_with("/m.json"),
            "{child}"
        );
        // a child "directory" URL opens as a store again
        let sub = Store::open(&store.child_url("sub")).unwrap();
        sub.put("k", Bytes::from_static(b"v")).unwrap();
        assert_eq!(store.list("sub/").unwrap(), vec![("sub/k".to_string(), 1)]);
    }

    #[test]
    fn errors_name_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        let err = format!("{:#}", store.get("missing.tar").unwrap_err());
        assert!(err.contains(&store.child_url("missing.tar")), "{err}");
        let missing = dir.path().join("absent");
        let err = format!(
            "{:#}",
            Store::open_existing(missing.to_str().unwrap()).unwrap_err()
        );
        assert!(err.contains("absent"), "{err}");
        assert!(!missing.exists());
    }

    #[test]
    fn memory_store() {
        let store = Store::open("memory://").unwrap();
        assert!(store.local_path().is_none());
        store.put("a/b", Bytes::from_static(b"1")).unwrap();
        assert_eq!(&store.get("a/b").unwrap()[..], b"1");
        assert_eq!(store.list("a").unwrap(), vec![("a/b".to_string(), 1)]);
    }
}
