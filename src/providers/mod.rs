//! The provider mirror: Terraform providers, pulled through from their registries, verified
//! before they are kept, and served with Terraform's provider network mirror protocol.
//!
//! | module | concern |
//! |---|---|
//! | [`route`] | `/providers/...` paths parsed into a typed route |
//! | [`upstream`] | registry calls (discovery, `versions`, `download`), fetch rules, breakers |
//! | [`verify`] | OpenPGP signature of `SHA256SUMS`, package checksums, `zh:` hashes |
//! | [`dirhash`] | Terraform's `h1:` hash of a package's contents (lock files, mirror directories) |
//! | [`freshness`] | what to do with a cached version list (pure) |
//! | [`mirror`] | the answers to provider routes (network mirror and registry protocols), decided as values |
//! | `reply` | those answers' shapes ([`crate::respond::Reply`]); `edge::write::reply` alone writes them |
//!
//! This module holds the cache logic between them:
//! - **version lists** (`provider-versions` records) follow `cache.listing_ttl`,
//!   `stale_while_revalidate` and `stale_if_error`, with a breaker per registry;
//! - **checksums** (`provider-sums` records): a version's `SHA256SUMS`, kept only once its
//!   signature verified against the registry's signing keys. Immutable, like versions are;
//! - **packages**: zips in the shared blob store (blake3-addressed, verified on read, LRU),
//!   filled once however many clients ask, indexed as tarballs under
//!   `provider:<host>/<ns>/<type>@<version>/<os>_<arch>` so `tfmirror cache ls/verify/gc`
//!   cover them. A zip whose sha256 differs from the signed one fails its fill: it is neither
//!   stored nor served whole.

pub mod dirhash;
pub(crate) mod freshness;
pub(crate) mod mirror;
mod reply;
/// Provider paths (a leaf module of its own, so `routes` can name them).
pub use crate::routes::provider as route;
pub(crate) mod upstream;
pub(crate) mod verify;
pub(crate) mod warm;

#[cfg(test)]
mod answer_tests;
#[cfg(test)]
mod testkit;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt, TryStreamExt};
use http::StatusCode;
use serde::Serialize;

use crate::cache::fill::{FillError, Opener, Source};
use crate::cache::records::TarballEntry;
use crate::cache::Cache;
use crate::clock::now as unix_now;
use crate::metrics;
use crate::respond::CacheStatus;
use freshness::{plan, Plan, Windows};
use route::{Platform, ProviderId};
use upstream::{Registries, UpError};
use verify::Refusal;

use crate::cache::records;
pub use crate::cache::records::{
    provider_archive_key as archive_key, DownloadRecord, ModuleDownloadRecord, Package, SumsRecord,
    VersionsRecord, KIND_PROVIDER_DOWNLOAD as KIND_DOWNLOAD, KIND_PROVIDER_SUMS as KIND_SUMS,
    KIND_PROVIDER_VERSIONS as KIND_VERSIONS, KIND_PUBLIC_MODULE_DOWNLOAD,
    PROVIDER_KEY_PREFIX as ARCHIVE_KEY_PREFIX,
};

/// Which version list: a provider's, or a public registry module's.
#[derive(Debug, Clone)]
pub enum Listing {
    Provider(ProviderId),
    /// The module `namespace/name/system` of a registry host (`ProviderId.name` is the
    /// module name).
    Module(ProviderId, String),
}

impl Listing {
    fn key(&self) -> String {
        match self {
            Listing::Provider(p) => records::provider_versions_key(p),
            Listing::Module(m, system) => records::registry_module_versions_key(m, system),
        }
    }

    fn host(&self) -> &str {
        match self {
            Listing::Provider(p) | Listing::Module(p, _) => &p.host,
        }
    }
}

/// A value found, and how.
pub struct Found<T> {
    pub value: T,
    pub cache: CacheStatus,
    /// Seconds since it was fetched upstream.
    pub age: u64,
}

/// No value: the status to answer with, and the cache status to say.
#[derive(Debug, Clone, Copy)]
pub struct Failed {
    pub status: StatusCode,
    pub cache: CacheStatus,
    /// The registry's own `Retry-After` (seconds), relayed with its 429.
    pub retry_after: Option<u64>,
}

impl Failed {
    pub fn new(status: StatusCode, cache: CacheStatus) -> Failed {
        Failed {
            status,
            cache,
            retry_after: None,
        }
    }

    /// The answer for an upstream failure: its status, and a 429's `Retry-After`.
    pub fn up(e: &UpError, cache: CacheStatus) -> Failed {
        Failed {
            retry_after: e.retry_after(),
            ..Failed::new(e.status(), cache)
        }
    }
}

/// Count a verification outcome, and log refusals (no URLs: coordinates and reason only).
fn verification(p: &ProviderId, version: &str, result: Result<&'static str, Refusal>) {
    let label = match result {
        Ok(l) => l,
        Err(r) => {
            tracing::error!(
                provider = %p,
                version,
                reason = r.label(),
                "provider package refused: failed verification; nothing kept"
            );
            r.label()
        }
    };
    metrics::PROVIDER_VERIFICATIONS
        .with_label_values(&[label])
        .inc();
}

pub struct Providers {
    registries: Arc<Registries>,
    cache: Arc<Cache>,
    windows: Windows,
    /// `offline.deadline`: how long a registry may take before it counts as failed (slow
    /// is not down: below this, tfmirror waits whatever it has cached).
    deadline: Duration,
    allow_unsigned: bool,
    /// Memory fronts of the records on disk, so hits read no file.
    versions_front: moka::sync::Cache<String, Arc<VersionsRecord>>,
    sums_front: moka::sync::Cache<String, Arc<SumsRecord>>,
    /// Download answers checked against their version's verified checksums, by
    /// `provider_download_key`, for the minute in which a cold package is filled: the answer
    /// fetched with the checksums serves that package's fill too (one answer per cold
    /// package, not two or three). Short-lived: its URLs may be presigned.
    answers: moka::sync::Cache<String, Arc<upstream::DownloadAnswer>>,
    /// Version lists being fetched: one exchange per list (`crate::flight`).
    listing_flights: crate::flight::Flights<String, Result<Arc<VersionsRecord>, UpError>>,
    /// Checksums being fetched and verified: one per version.
    sums_flights: crate::flight::Flights<String, Result<Arc<SumsRecord>, Failed>>,
    refreshing: crate::flight::Running<String>,
}

impl Providers {
    /// The provider mirror of `config`, its registries reached over https.
    pub fn new(config: &crate::config::Config, cache: Arc<Cache>) -> Result<Providers, String> {
        Ok(Providers::with_registries(
            config,
            cache,
            Registries::new(config)?,
        ))
    }

    /// The provider mirror of `config`, its registries reached through `transport` (a stub,
    /// in unit tests).
    pub fn with_transport(
        config: &crate::config::Config,
        cache: Arc<Cache>,
        transport: Arc<dyn upstream::Transport>,
    ) -> Providers {
        let registries = Registries::with_transport(config, transport);
        Providers::with_registries(config, cache, registries)
    }

    fn with_registries(
        config: &crate::config::Config,
        cache: Arc<Cache>,
        registries: Registries,
    ) -> Providers {
        Providers {
            registries: Arc::new(registries),
            cache,
            windows: Windows {
                ttl: config.cache.listing_ttl.as_secs(),
                revalidate: config.cache.stale_while_revalidate.as_secs(),
                stale_if_error: config.cache.stale_if_error.as_secs(),
            },
            deadline: config.offline.deadline,
            allow_unsigned: config.providers.allow_unsigned,
            versions_front: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(30))
                .build(),
            // Short-lived like the tarball index front, so that `tfmirror cache purge` run
            // beside a server takes effect.
            answers: moka::sync::Cache::builder()
                .max_capacity(1_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            sums_front: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(30))
                .build(),
            listing_flights: Default::default(),
            sums_flights: Default::default(),
            refreshing: Default::default(),
        }
    }

    /// A record of `kind` from disk, read off the runtime.
    async fn read_record<T>(&self, kind: &'static str, key: &str) -> Option<T>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        self.cache.records().get(kind, key.to_string()).await
    }

    /// A record behind a memory front: from the front, else from disk (then put in front),
    /// so that hits read no file.
    async fn load_fronted<T>(
        &self,
        front: &moka::sync::Cache<String, Arc<T>>,
        kind: &'static str,
        key: &str,
    ) -> Option<Arc<T>>
    where
        T: serde::de::DeserializeOwned + Send + Sync + 'static,
    {
        if let Some(r) = front.get(key) {
            return Some(r);
        }
        let rec = Arc::new(self.read_record::<T>(kind, key).await?);
        front.insert(key.to_string(), rec.clone());
        Some(rec)
    }

    /// Record `value` on disk, off the runtime. A failure is counted and logged, and the
    /// answer is served all the same: it is asked for again next time.
    async fn write_record<T>(&self, kind: &'static str, key: &str, value: Arc<T>)
    where
        T: Serialize + Send + Sync + 'static,
    {
        let stored = self.cache.records().put(kind, key.to_string(), value).await;
        if stored.is_err() {
            metrics::CACHE_WRITE_ERRORS.inc();
            tracing::error!(kind, record = %key, "could not record a provider mirror answer");
        }
    }

    /// The status when the upstream may not be asked and nothing is cached.
    fn unavailable(&self) -> Failed {
        let status = if self.registries.is_offline() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::BAD_GATEWAY
        };
        Failed::new(status, CacheStatus::Miss)
    }

    // ---------------------------------------------------------------------------------------
    // Version lists

    async fn load_versions(&self, key: &str) -> Option<Arc<VersionsRecord>> {
        self.load_fronted(&self.versions_front, KIND_VERSIONS, key)
            .await
    }

    /// The version list of `p`, from the cache or its registry (see [`freshness`]).
    pub async fn versions(
        self: &Arc<Self>,
        p: &ProviderId,
    ) -> Result<Found<Arc<VersionsRecord>>, Failed> {
        self.listing(&Listing::Provider(p.clone())).await
    }

    /// A version list, from the cache or its registry (see [`freshness`]).
    pub async fn listing(
        self: &Arc<Self>,
        l: &Listing,
    ) -> Result<Found<Arc<VersionsRecord>>, Failed> {
        let key = l.key();
        let cached = self.load_versions(&key).await;
        let now = unix_now();
        let age = cached.as_ref().map(|r| now.saturating_sub(r.fetched_at));
        let found = |value: &Option<Arc<VersionsRecord>>, cache| Found {
            value: value.clone().expect("planned on a cached list"),
            cache,
            age: age.unwrap_or(0),
        };
        let upstream = if self.registries.is_offline() {
            freshness::Upstream::Sealed
        } else if self.registries.available(l.host()) {
            freshness::Upstream::Available
        } else {
            freshness::Upstream::Failing
        };
        match plan(age, self.windows, upstream) {
            Plan::Hit => Ok(found(&cached, CacheStatus::Hit)),
            Plan::Updating => {
                self.refresh_in_background(l);
                Ok(found(&cached, CacheStatus::Updating))
            }
            Plan::Stale => {
                metrics::STALE_SERVED.inc();
                Ok(found(&cached, CacheStatus::Stale))
            }
            Plan::Unavailable => Err(self.unavailable()),
            Plan::Ask { fallback } => {
                let result = match tokio::time::timeout(self.deadline, self.fetch_listing(l)).await
                {
                    Ok(fetched) => fetched,
                    Err(_) => Err(UpError::Transport { timeout: true }),
                };
                match result {
                    Ok(rec) => Ok(Found {
                        value: rec,
                        cache: CacheStatus::Miss,
                        age: 0,
                    }),
                    Err(e) if fallback && self.registries.is_outage(&e) => {
                        metrics::STALE_SERVED.inc();
                        Ok(found(&cached, CacheStatus::Stale))
                    }
                    Err(e) => Err(Failed::up(&e, CacheStatus::Miss)),
                }
            }
        }
    }

    /// Ask the registry (one exchange per list at a time, `crate::flight`) and record the
    /// answer. The exchange runs as a task of its own: when a caller's deadline passes, it
    /// still completes and refreshes the cache for the next caller.
    async fn fetch_listing(self: &Arc<Self>, l: &Listing) -> Result<Arc<VersionsRecord>, UpError> {
        let (this, listing) = (self.clone(), l.clone());
        let start = move || {
            upstream::carried(async move { this.fetch_listing_now(&listing).await }).boxed()
        };
        let (_, flight, _) = self.listing_flights.join_or_start(l.key(), (), start);
        flight.await
    }

    async fn fetch_listing_now(&self, l: &Listing) -> Result<Arc<VersionsRecord>, UpError> {
        let key = l.key();
        let rec = Arc::new(match l {
            Listing::Provider(p) => VersionsRecord {
                versions: self.registries.versions(p).await?,
                fetched_at: unix_now(),
                module_listing: None,
            },
            Listing::Module(m, system) => VersionsRecord {
                versions: Vec::new(),
                fetched_at: unix_now(),
                module_listing: Some(self.registries.module_versions(m, system).await?),
            },
        });
        self.write_record(KIND_VERSIONS, &key, rec.clone()).await;
        self.versions_front.insert(key, rec.clone());
        Ok(rec)
    }

    fn refresh_in_background(self: &Arc<Self>, l: &Listing) {
        let key = l.key();
        let Some(running) = self.refreshing.try_start(key.clone()) else {
            return; // one is already running
        };
        let this = self.clone();
        let l = l.clone();
        tokio::spawn(async move {
            if let Err(e) = this.fetch_listing(&l).await {
                tracing::warn!(listing = %key, error = ?e, "background refresh of a version list failed");
            }
            drop(running);
        });
    }

    // ---------------------------------------------------------------------------------------
    // Checksums

    async fn load_sums(&self, key: &str) -> Option<Arc<SumsRecord>> {
        self.load_fronted(&self.sums_front, KIND_SUMS, key).await
    }

    /// The verified checksums of a version: cached, or fetched and verified now.
    pub async fn sums(
        self: &Arc<Self>,
        p: &ProviderId,
        version: &str,
    ) -> Result<Found<Arc<SumsRecord>>, Failed> {
        self.sums_for(p, version, None).await
    }

    /// [`Providers::sums`], fetched (when not recorded) through `platform`'s download answer
    /// if the version lists that platform: the answer is then at hand for its package.
    pub async fn sums_for(
        self: &Arc<Self>,
        p: &ProviderId,
        version: &str,
        platform: Option<&Platform>,
    ) -> Result<Found<Arc<SumsRecord>>, Failed> {
        let key = records::provider_sums_key(p, version);
        let hit = |r: Arc<SumsRecord>| Found {
            age: unix_now().saturating_sub(r.fetched_at),
            value: r,
            cache: CacheStatus::Hit,
        };
        if let Some(r) = self.load_sums(&key).await {
            return Ok(hit(r));
        }
        if !self.registries.available(&p.host) {
            return Err(self.unavailable());
        }
        let this = self.clone();
        let (p, version, platform) = (p.clone(), version.to_string(), platform.cloned());
        let flight_key = key.clone();
        let start = move || {
            let fetch = async move {
                let platform = this.some_platform(&p, &version, platform.as_ref()).await?;
                let rec = this
                    .fetch_sums(&p, &version, &platform)
                    .await
                    .map_err(|e| e.failed(CacheStatus::Miss))?;
                let rec = Arc::new(rec);
                this.write_record(KIND_SUMS, &flight_key, rec.clone()).await;
                this.sums_front.insert(flight_key, rec.clone());
                Ok(rec)
            };
            upstream::carried(fetch).boxed()
        };
        let (_, flight, _) = self.sums_flights.join_or_start(key, (), start);
        let rec = flight.await?;
        Ok(Found {
            value: rec,
            cache: CacheStatus::Miss,
            age: 0,
        })
    }

    /// A platform the registry lists for `version`: any one's download answer names the
    /// version's `SHA256SUMS` (`wanted` when listed, else linux_amd64 when listed). 404 when
    /// the version is not listed.
    async fn some_platform(
        self: &Arc<Self>,
        p: &ProviderId,
        version: &str,
        wanted: Option<&Platform>,
    ) -> Result<Platform, Failed> {
        let listing = self.versions(p).await?;
        // Not listed: known from the list alone, so the answer is as cached as the list.
        let unlisted = Failed::new(StatusCode::NOT_FOUND, listing.cache);
        let info = listing
            .value
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or(unlisted)?;
        let find = |os: &str, arch: &str| {
            info.platforms
                .iter()
                .find(|pl| pl.os == os && pl.arch == arch)
        };
        wanted
            .and_then(|w| find(&w.os, &w.arch))
            .or_else(|| find("linux", "amd64"))
            .or(info.platforms.first())
            .and_then(|pl| Platform::parse(&format!("{}_{}", pl.os, pl.arch)))
            .ok_or(unlisted)
    }

    /// Download answer, `SHA256SUMS`, its signature: verified, or refused (and counted).
    async fn fetch_sums(
        &self,
        p: &ProviderId,
        version: &str,
        platform: &Platform,
    ) -> Result<SumsRecord, Fetched> {
        let answer = self.registries.download(p, version, platform).await?;
        let doc = self
            .registries
            .named_file(p, &answer, &answer.shasums_url)
            .await?;
        let refuse = |r: Refusal| {
            verification(p, version, Err(r));
            Fetched::Refused
        };
        let mut signature = None;
        let signed_by = if answer.keys.is_empty() {
            if !self.allow_unsigned {
                return Err(refuse(Refusal::NoSigningKeys));
            }
            tracing::warn!(provider = %p, version, "registry gave no signing key; accepted on checksums alone (providers.allow_unsigned)");
            verification(p, version, Ok("unsigned_accepted"));
            None
        } else {
            let sig = self
                .registries
                .named_file(p, &answer, &answer.shasums_signature_url)
                .await?;
            let id = verify::check_signature(&doc, &sig, &answer.keys).map_err(refuse)?;
            verification(p, version, Ok("signature_ok"));
            signature = Some(sig);
            Some(id)
        };
        let sums = verify::Sums::parse(&doc);
        verify::expected_sha(&sums, &answer.filename, Some(&answer.shasum)).map_err(refuse)?;
        let archives = packages(&sums, &p.name, version);
        if archives.is_empty() {
            return Err(refuse(Refusal::NotListed));
        }
        // Verified: now the exact bytes may be kept, and the answer used for its package.
        let key = records::provider_download_key(p, version, platform);
        self.answers.insert(key, Arc::new(answer));
        let document = self.keep(doc).await;
        let signature = match signature {
            Some(s) => self.keep(s).await,
            None => None,
        };
        Ok(SumsRecord {
            archives,
            signed_by,
            fetched_at: unix_now(),
            document,
            signature,
        })
    }

    /// Store verified bytes as a blob; its hash (hex), or None when the disk refused.
    async fn keep(&self, bytes: bytes::Bytes) -> Option<String> {
        self.cache
            .put_small(bytes)
            .await
            .map(|h| h.to_hex().to_string())
            .ok()
    }

    // ---------------------------------------------------------------------------------------
    // Download answers (registry protocol pass-through)

    /// The registry's download answer for a platform: recorded, or fetched now and checked
    /// against the version's verified checksums (which are fetched first if need be).
    pub async fn download_answer(
        self: &Arc<Self>,
        p: &ProviderId,
        version: &str,
        platform: &Platform,
    ) -> Result<Found<DownloadRecord>, Failed> {
        let key = records::provider_download_key(p, version, platform);
        if let Some(r) = self
            .read_record::<DownloadRecord>(KIND_DOWNLOAD, &key)
            .await
        {
            return Ok(Found {
                age: unix_now().saturating_sub(r.fetched_at),
                value: r,
                cache: CacheStatus::Hit,
            });
        }
        let sums = self.sums_for(p, version, Some(platform)).await?.value;
        let miss = |status| Failed::new(status, CacheStatus::Miss);
        let Some(pkg) = sums.archives.get(&platform.to_string()) else {
            return Err(miss(StatusCode::NOT_FOUND));
        };
        if !self.registries.available(&p.host) {
            return Err(self.unavailable());
        }
        let answer = self
            .checked_answer(p, version, platform, pkg)
            .await
            .map_err(|e| e.failed(CacheStatus::Miss))?;
        let rec = DownloadRecord {
            answer: answer.raw.clone(),
            fetched_at: unix_now(),
        };
        self.write_record(KIND_DOWNLOAD, &key, Arc::new(rec.clone()))
            .await;
        Ok(Found {
            value: rec,
            cache: CacheStatus::Miss,
            age: 0,
        })
    }

    // ---------------------------------------------------------------------------------------
    // Public registry modules (`modules.v1` pass-through)

    /// Where a public module version's source is (`X-Terraform-Get`): recorded (versions are
    /// immutable in a registry), or asked now. The bytes themselves are not cached: they
    /// mostly live in git repositories Terraform clones itself.
    pub async fn module_download(
        self: &Arc<Self>,
        m: &ProviderId,
        system: &str,
        version: &str,
    ) -> Result<Found<ModuleDownloadRecord>, Failed> {
        let key = records::public_module_download_key(m, system, version);
        let cached = self.read_record::<ModuleDownloadRecord>(KIND_PUBLIC_MODULE_DOWNLOAD, &key);
        if let Some(r) = cached.await {
            return Ok(Found {
                age: unix_now().saturating_sub(r.fetched_at),
                value: r,
                cache: CacheStatus::Hit,
            });
        }
        if !self.registries.available(&m.host) {
            return Err(self.unavailable());
        }
        let location = self
            .registries
            .module_download(m, system, version)
            .await
            .map_err(|e| Failed::up(&e, CacheStatus::Miss))?;
        let rec = ModuleDownloadRecord {
            location,
            fetched_at: unix_now(),
        };
        self.write_record(KIND_PUBLIC_MODULE_DOWNLOAD, &key, Arc::new(rec.clone()))
            .await;
        Ok(Found {
            value: rec,
            cache: CacheStatus::Miss,
            age: 0,
        })
    }

    // ---------------------------------------------------------------------------------------
    // Packages

    /// A committed package's index entry.
    pub async fn cached_archive(&self, key: &str) -> Option<TarballEntry> {
        self.cache.tarball(key).await
    }

    /// Join or start the fill of a package. Its bytes must hash to `pkg.sha256` (from the
    /// verified checksums) or the fill fails and nothing is kept.
    pub fn start_archive_fill(
        self: &Arc<Self>,
        p: &ProviderId,
        version: &str,
        platform: &Platform,
        pkg: &Package,
    ) -> std::io::Result<(Arc<crate::cache::fill::Fill>, bool)> {
        let key = archive_key(p, version, platform);
        let this = self.clone();
        let (p, version, platform, pkg) = (
            p.clone(),
            version.to_string(),
            platform.clone(),
            pkg.clone(),
        );
        let (p2, v2) = (p.clone(), version.clone());
        let open = move || -> Opener {
            let open = async move { this.open_archive(&p, &version, &platform, &pkg).await };
            upstream::carried(open).boxed()
        };
        self.cache
            .fill_tarball(&key, open, move |_previous, hash, size| {
                verification(&p2, &v2, Ok("checksum_ok"));
                // A provider package never changes under a version (it is verified against the
                // registry's signed checksums), so it keeps no re-publish history.
                TarballEntry {
                    hash: hash.to_hex().to_string(),
                    size,
                    fetched_at: unix_now(),
                    fetched_at_ms: crate::clock::now_ms(),
                    replaced: Vec::new(),
                }
            })
    }

    /// The registry's download answer for `pkg`, checked against the version's verified
    /// checksums: it must name the package they list, with their sha256. A mismatch is
    /// counted and refused.
    async fn checked_answer(
        &self,
        p: &ProviderId,
        version: &str,
        platform: &Platform,
        pkg: &Package,
    ) -> Result<Arc<upstream::DownloadAnswer>, Fetched> {
        let expected = verify::parse_hex(&pkg.sha256).ok_or(Fetched::Refused)?;
        let key = records::provider_download_key(p, version, platform);
        let answer = match self.answers.get(&key) {
            Some(a) => a,
            None => Arc::new(self.registries.download(p, version, platform).await?),
        };
        let signed = verify::Sums::from_iter([(pkg.filename.clone(), expected)]);
        if let Err(r) = verify::expected_sha(&signed, &answer.filename, Some(&answer.shasum)) {
            self.answers.invalidate(&key);
            verification(p, version, Err(r));
            return Err(Fetched::Refused);
        }
        self.answers.insert(key, answer.clone());
        Ok(answer)
    }

    async fn open_archive(
        &self,
        p: &ProviderId,
        version: &str,
        platform: &Platform,
        pkg: &Package,
    ) -> Result<Source, FillError> {
        let up = |e: UpError| match e {
            UpError::NotFound => FillError::Refused(StatusCode::NOT_FOUND),
            UpError::RateLimited { .. } => FillError::Refused(StatusCode::TOO_MANY_REQUESTS),
            UpError::Transport { timeout: true } => {
                FillError::Upstream("provider registry timed out")
            }
            _ => FillError::Upstream("provider registry failed"),
        };
        let expected = verify::parse_hex(&pkg.sha256).ok_or(FillError::Disk)?;
        let answer = self
            .checked_answer(p, version, platform, pkg)
            .await
            .map_err(|e| match e {
                Fetched::Up(e) => up(e),
                Fetched::Refused => FillError::Upstream("provider package failed verification"),
            })?;
        let resp = self.registries.open_package(p, &answer).await.map_err(up)?;
        let end = crate::cache::fill::End::of(resp.version(), resp.headers());
        let body = resp
            .bytes_stream()
            .map_err(|_| "upstream body failed")
            .boxed();
        let (pc, vc) = (p.clone(), version.to_string());
        let body = verify::sha256_checked(body, expected, move || {
            verification(&pc, &vc, Err(Refusal::ChecksumMismatch));
        });
        Ok(Source { end, body })
    }
}

/// The packages a verified `SHA256SUMS` lists for this provider and version, by platform.
fn packages(sums: &verify::Sums, name: &str, version: &str) -> BTreeMap<String, Package> {
    sums.listed()
        .filter_map(|(file, sha)| {
            let platform = verify::platform_of(file, name, version)?;
            let pkg = Package {
                filename: file.to_string(),
                sha256: verify::to_hex(&sha),
                h1: None,
            };
            Some((platform, pkg))
        })
        .collect()
}

/// Why checksums could not be had.
enum Fetched {
    Up(UpError),
    /// Failed verification (already counted and logged).
    Refused,
}

impl Fetched {
    /// The answer: the registry's failure, else a 502.
    fn failed(&self, cache: CacheStatus) -> Failed {
        match self {
            Fetched::Up(e) => Failed::up(e, cache),
            Fetched::Refused => Failed::new(StatusCode::BAD_GATEWAY, cache),
        }
    }
}

impl From<UpError> for Fetched {
    fn from(e: UpError) -> Self {
        Fetched::Up(e)
    }
}
