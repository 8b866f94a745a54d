//! The access policy: who gets what, fresh or stale. Written once, as pure code.
//!
//! Every registry answer that could come from the cache goes through [`decide`]: namespace
//! listings and metadata, download URLs, and project routes (their `?terraform-get=1` check
//! and their tarballs). `/file` needs no grant: it takes a tfmirror token, minted only after
//! this policy allowed the download.
//!
//! [`decide`] takes facts and returns an [`Action`]; it reads no clock, no disk and no
//! network. The handlers in `registry/` gather the facts, call it once before asking GitLab
//! (`gitlab: NotAsked`) and, when they did ask, once more with what GitLab did.
//!
//! The rules, in words (the README's security model says the same):
//! 1. A *fresh grant* (GitLab said yes to this identity for this module less than
//!    `auth.grant_ttl` ago) is served from the cache without asking GitLab. A listing past
//!    `cache.listing_ttl` is served while it is refreshed in the background
//!    (stale-while-revalidate), if GitLab is up and the identity's credential is at hand.
//! 2. Otherwise GitLab decides, and its answer is relayed and learned: success records the
//!    grant; 401/403 (and a project route's 404, which means "no access") revoke it.
//! 3. A stale answer is served only when GitLab **failed**: it could not be reached, did not
//!    answer within `offline.deadline`, answered 5xx, or the breaker is open after such
//!    failures, or tfmirror runs `--offline`. Slow is not failed, and a 429 is not failed:
//!    it belongs to the caller who provoked it, and is relayed to that caller alone.
//! 4. Stale answers, in order: the identity's own last answer (its grant, expired or not,
//!    within `auth.grant_ttl + cache.stale_if_error`); a module GitLab served anonymously
//!    (public); then what any authorized caller received, if `offline.unknown_identity`
//!    allows it for this caller *and the breaker says GitLab is down*: a caller whose own
//!    request failed (a 5xx of its own, its deadline) while GitLab answers everyone else does
//!    not read what others fetched. An identity GitLab refused gets nothing, ever, until
//!    GitLab says yes again: GitLab's refusal is replayed to it (`Refuse(RefusedBefore)`),
//!    whatever GitLab's state, so that a tfmirror tier in front reads it as the refusal it
//!    is, never as an outage.
//!    On a sealed mirror (`--offline`), what a signed bundle brought (`tfmirror bundle
//!    import`) comes next, whatever its age (nothing newer can come): a module the exporting
//!    GitLab served anonymously to anyone, a private one as `offline.imported_readers` says
//!    (no one, anyone, or the callers listed in `offline.readers_file`). Imported answers are
//!    never read while a GitLab can be asked, and `offline.unknown_identity` never opens them.
//! 5. Nothing to serve: a clear refusal that says GitLab is unavailable (never mistaken for
//!    GitLab's own refusal by a tfmirror tier in front).

use crate::config::{ImportedReaders, UnknownIdentity};
use crate::windows::Age;

/// The time windows of the policy, in seconds.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// `auth.grant_ttl`: how long GitLab's yes is trusted without asking again.
    pub grant_ttl: u64,
    /// `cache.listing_ttl`: how long a listing body is served as fresh.
    pub listing_ttl: u64,
    /// `cache.stale_while_revalidate`: past `listing_ttl`, served while refreshed.
    pub revalidate: u64,
    /// `cache.stale_if_error`: past the ttls, served only while GitLab fails.
    pub stale_if_error: u64,
}

impl Windows {
    /// The listing's freshness windows, read with the one convention of [`crate::windows`].
    fn listing(&self) -> crate::windows::Windows {
        crate::windows::Windows {
            ttl: self.listing_ttl,
            revalidate: self.revalidate,
            stale_if_error: self.stale_if_error,
        }
    }
}

/// What kind of answer is being decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `versions`, latest or a version's metadata: a body with its own age.
    Listing,
    /// `:version/download`, or a project route's `?terraform-get=1` and tarball.
    Download,
}

/// The identity's standing for this module, from its grant record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// GitLab said yes less than `grant_ttl` ago.
    Fresh,
    /// GitLab said yes longer ago, but within `grant_ttl + stale_if_error`.
    Expired,
    /// GitLab refused this identity since its last yes.
    Refused,
    /// Never seen, or seen too long ago.
    Unknown,
}

/// Standing from a grant's facts: when GitLab last said yes, and whether it refused since.
pub fn standing(checked_at: Option<u64>, refused: bool, now: u64, w: &Windows) -> Standing {
    if refused {
        return Standing::Refused;
    }
    match checked_at.map(|at| now.saturating_sub(at)) {
        Some(age) if age < w.grant_ttl.max(1) => Standing::Fresh,
        Some(age) if age <= w.grant_ttl + w.stale_if_error => Standing::Expired,
        _ => Standing::Unknown,
    }
}

/// What GitLab did for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gitlab {
    /// Not asked (yet).
    NotAsked,
    /// Answered with something to relay: success, or an answer such as "not found".
    Answered,
    /// Refused this caller: 401/403, or 404 where it means "no access".
    Refused,
    /// Rate-limited this caller (429). The caller provoked it: it never opens the cache.
    RateLimited,
    /// Failed: unreachable, no answer within the deadline, 5xx, or upstream-wide 503.
    Failed,
}

/// The circuit breaker, as the handler found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    Up,
    /// Recent consecutive failures: GitLab is treated as failed without being asked, except
    /// by a request that has nothing stale to fall back on (it probes).
    Open,
    /// `--offline`: GitLab is never asked.
    Offline,
}

/// Everything [`decide`] knows. Ages are from `now`; timestamps are unix seconds.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    pub now: u64,
    pub kind: Kind,
    pub standing: Standing,
    /// When this identity's own answer for this route was fetched: its listing body, or for
    /// a download, its grant's last check if the version is in its current listing.
    pub own: Option<u64>,
    /// When GitLab last served this answer to an anonymous caller (the module is public).
    pub public: Option<u64>,
    /// When GitLab last served this answer to any authorized caller.
    pub shared: Option<u64>,
    /// The caller presented a credential.
    pub has_credential: bool,
    /// An upload through tfmirror changed the module since `own` was fetched.
    pub invalidated: bool,
    /// The identity's credential is in memory, so a background refresh can ask for it.
    pub can_refresh: bool,
    /// GitLab refused this caller on this path moments ago (`auth.negative_ttl`).
    pub recently_refused: bool,
    /// GitLab rate-limited this caller for this module, and its `Retry-After` runs.
    pub held_back: bool,
    pub breaker: Breaker,
    pub gitlab: Gitlab,
    pub unknown_identity: UnknownIdentity,
    /// A signed bundle brought this answer; read only on a sealed mirror.
    pub imported: Option<Bundled>,
    /// `offline.imported_readers`.
    pub imported_readers: ImportedReaders,
    /// The caller's credential is listed in `offline.readers_file`.
    pub listed_reader: bool,
}

/// An answer a signed bundle brought (`tfmirror bundle import`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bundled {
    /// The exporting GitLab served the module to anonymous callers: public stays public.
    Public,
    /// A private module: `offline.imported_readers` says who reads it.
    Private,
}

/// Where a stale answer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleSource {
    /// The identity's own last answer.
    Own,
    /// What GitLab served anonymously.
    Public,
    /// What an authorized caller received; `offline.unknown_identity: anyone`, while the
    /// breaker says GitLab is down.
    SharedAnyone,
    /// The same, to a caller with a credential; `offline.unknown_identity: authenticated`.
    SharedAuthenticated,
    /// What a signed bundle brought, on a sealed mirror (`offline.imported_readers`).
    Imported,
}

/// Why nothing can be served while GitLab fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// GitLab refused this identity before; that stands until GitLab says yes, and its
    /// refusal is what the identity gets.
    RefusedBefore,
    /// Never authorized, and `offline.unknown_identity` gives it nothing.
    UnknownDenied,
    /// Allowed in principle, but nothing (recent enough) is cached for this route.
    NothingCached,
    /// A bundle brought this private module, and `offline.imported_readers` does not admit
    /// this caller.
    NotReader,
}

/// What to do with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Serve the identity's own cached answer (HIT).
    Fresh,
    /// Serve it and refresh it in the background (UPDATING).
    Revalidate,
    /// Replay the refusal GitLab gave this caller moments ago (spares GitLab a storm).
    Replay,
    /// Answer 429 without asking: this caller's own `Retry-After` runs.
    HoldBack,
    /// Ask GitLab. With the breaker open, this request is the probe.
    Ask,
    /// Relay GitLab's answer (and learn from it).
    Relay,
    /// Serve a stale answer (STALE).
    Stale(StaleSource),
    /// GitLab failed or cannot be asked, and nothing may be served.
    Refuse(Why),
}

/// The policy. See the module doc for the rules in words.
pub fn decide(f: &Facts, w: &Windows) -> Action {
    match f.gitlab {
        Gitlab::NotAsked => before_asking(f, w),
        Gitlab::Answered | Gitlab::Refused | Gitlab::RateLimited => Action::Relay,
        Gitlab::Failed => stale(f, w).map_or_else(Action::Refuse, Action::Stale),
    }
}

fn before_asking(f: &Facts, w: &Windows) -> Action {
    if let (Standing::Fresh, Some(at), false) = (f.standing, f.own, f.invalidated) {
        match (f.kind, w.listing().age(f.now.saturating_sub(at))) {
            (Kind::Download, _) => return Action::Fresh,
            (Kind::Listing, Age::Fresh) => return Action::Fresh,
            (Kind::Listing, Age::Revalidate) if f.breaker == Breaker::Up && f.can_refresh => {
                return Action::Revalidate
            }
            (Kind::Listing, _) => {}
        }
    }
    if f.recently_refused {
        return Action::Replay;
    }
    if f.held_back {
        return Action::HoldBack;
    }
    match f.breaker {
        Breaker::Up => Action::Ask,
        // Known failing: what may be served stale is served now; the rest probes.
        Breaker::Open => stale(f, w).map_or(Action::Ask, Action::Stale),
        Breaker::Offline => stale(f, w).map_or_else(Action::Refuse, Action::Stale),
    }
}

/// The stale answer this caller may have while GitLab fails, or why there is none.
fn stale(f: &Facts, w: &Windows) -> Result<StaleSource, Why> {
    let listing = w.listing();
    let within =
        |at: Option<u64>| at.is_some_and(|at| listing.serves_on_error(f.now.saturating_sub(at)));
    match f.standing {
        Standing::Refused => return Err(Why::RefusedBefore),
        Standing::Fresh | Standing::Expired if within(f.own) => return Ok(StaleSource::Own),
        _ => {}
    }
    if within(f.public) {
        return Ok(StaleSource::Public);
    }
    let imported = imported(f);
    if imported == Some(true) {
        return Ok(StaleSource::Imported);
    }
    let shared = match (f.unknown_identity, f.has_credential) {
        (UnknownIdentity::Anyone, _) => Some(StaleSource::SharedAnyone),
        (UnknownIdentity::Authenticated, true) => Some(StaleSource::SharedAuthenticated),
        _ => None,
    };
    // What others fetched, only while GitLab is down for everyone (rule 4).
    let Some(source) = shared.filter(|_| f.breaker != Breaker::Up) else {
        // An identity GitLab authorized before is not "unknown": it just lacks this answer.
        return Err(match (imported, f.standing) {
            (Some(false), _) => Why::NotReader,
            (_, Standing::Fresh | Standing::Expired) => Why::NothingCached,
            _ => Why::UnknownDenied,
        });
    };
    match (within(f.shared), imported) {
        (true, _) => Ok(source),
        (false, Some(false)) => Err(Why::NotReader),
        (false, _) => Err(Why::NothingCached),
    }
}

/// On a sealed mirror, whether this caller may read the imported answer (None: there is
/// none, or a GitLab can be asked). Age plays no part: the bundle is all there is.
fn imported(f: &Facts) -> Option<bool> {
    if f.breaker != Breaker::Offline {
        return None;
    }
    Some(match f.imported? {
        Bundled::Public => true,
        Bundled::Private => match f.imported_readers {
            ImportedReaders::None => false,
            ImportedReaders::Anyone => true,
            ImportedReaders::Listed => f.listed_reader,
        },
    })
}

#[cfg(test)]
#[path = "policy/tests.rs"]
mod tests;
