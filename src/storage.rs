//! Object storage behind one small blocking API. OWNER: data helper. See CONTRACT below.
//!
//! CONTRACT (keep these names/signatures; add more if useful):
//! - `pub fn runtime() -> &'static tokio::runtime::Runtime` — one shared runtime for blocking calls.
//! - `pub struct Store` — a "directory" URL: plain path, `file:///abs/path`, (later s3://, gs://...).
//!   - `Store::open(url: &str) -> anyhow::Result<Store>` (creates a local directory if missing)
//!   - `fn url(&self) -> &str`, `fn child_url(&self, name: &str) -> String`
//!   - `fn local_path(&self) -> Option<std::path::PathBuf>` (Some for local file systems)
//!   - `fn get(&self, name: &str) -> anyhow::Result<bytes::Bytes>` (error names the URL)
//!   - `fn put(&self, name: &str, data: bytes::Bytes) -> anyhow::Result<()>` (atomic per object)
//!   - `fn list(&self, prefix: &str) -> anyhow::Result<Vec<(String, u64)>>` (relative names, sizes, sorted)
//!   - `fn exists(&self, name: &str) -> anyhow::Result<bool>`, `fn delete(&self, name: &str) -> anyhow::Result<()>`
//!   `name`s are '/'-separated keys relative to the store's URL.
