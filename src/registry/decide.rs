//! Gathering the facts [`crate::access::policy::decide`] needs, and counting what it decided.
//! The policy itself is pure; this is the I/O around it (grant records, module-wide records,
//! the breaker, the clock).

use http::HeaderValue;

use super::ask::{Asked, Failure};
use super::{reply, Lesson, Registry};
use crate::access::policy::{
    self, Action, Breaker, Bundled, Facts, Gitlab, Kind, StaleSource, Why,
};
use crate::cache::records::{
    shared_key, Grant, ImportedListing, ListingKey, Refusal, SharedListing, KIND_IMPORTED,
    KIND_SHARED, KIND_SHARED_PUBLIC,
};
use crate::clock::Moment;
use crate::config::ImportedReaders;
use crate::identity::Identity;
use crate::metrics::{self, Decision};
use crate::respond::{CacheStatus, Reply};
use crate::routes::ModuleId;

/// Which module-wide record could stand in for the caller's own answer.
pub(super) enum Fallback<'a> {
    /// A listing body (`op`) as GitLab served it anonymously or to anyone authorized.
    Listing {
        module: &'a ModuleId,
        op: &'a ListingKey,
    },
    /// A version that a module-wide versions listing showed.
    Version {
        module: &'a ModuleId,
        version: Option<&'a str>,
    },
}

/// The module-wide records read for a decision (only when they could matter).
#[derive(Default)]
pub(super) struct Records {
    pub public: Option<SharedListing>,
    pub shared: Option<SharedListing>,
    /// What a signed bundle brought (read on a sealed mirror only).
    pub imported: Option<ImportedListing>,
}

impl Records {
    /// The record a stale answer from `source` comes from (`None` for the caller's own).
    pub(super) fn of(&self, source: StaleSource) -> Option<&SharedListing> {
        match source {
            StaleSource::Own => None,
            StaleSource::Public => self.public.as_ref(),
            StaleSource::SharedAnyone | StaleSource::SharedAuthenticated => self.shared.as_ref(),
            StaleSource::Imported => self.imported.as_ref().map(|i| &i.listing),
        }
    }
}

impl Registry {
    pub(super) fn windows(&self) -> policy::Windows {
        policy::Windows {
            grant_ttl: self.auth.grant_ttl.as_secs(),
            listing_ttl: self.cfg.listing_ttl.as_secs(),
            revalidate: self.cfg.stale_while_revalidate.as_secs(),
            stale_if_error: self.cfg.stale_if_error.as_secs(),
        }
    }

    pub(super) fn breaker(&self) -> Breaker {
        if self.health.is_offline_mode() {
            Breaker::Offline
        } else if self.health.unavailable() {
            Breaker::Open
        } else {
            Breaker::Up
        }
    }

    /// The facts of a request before GitLab is asked, as of `moment` (the request's one clock
    /// reading). `own` is when the caller's own answer for this route was fetched, if it has
    /// one.
    ///
    /// Also returns the credential remembered for `identity`, for
    /// [`crate::access::grants::Auth::remember_for_grant`]: looked up once per request, as are
    /// the clock and each of the caller's in-memory records.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn facts(
        &self,
        moment: Moment,
        kind: Kind,
        identity: Identity,
        has_credential: bool,
        module: &ModuleId,
        grant: Option<&Grant>,
        own: Option<u64>,
        path: &str,
    ) -> (Facts, Option<HeaderValue>) {
        let (now, at) = (moment.unix, moment.at);
        let remembered = self.auth.credential(identity, at);
        let facts = Facts {
            now,
            kind,
            standing: policy::standing(
                grant.map(|g| g.checked_at),
                grant.is_some_and(|g| g.refused_at.is_some()),
                now,
                &self.windows(),
            ),
            own,
            public: None,
            shared: None,
            has_credential,
            invalidated: own.is_some_and(|at| self.invalidated(module, at)),
            can_refresh: identity.is_anonymous() || remembered.is_some(),
            recently_refused: self.auth.negative(identity, path, at).is_some(),
            held_back: self.auth.held(identity, module, at).is_some(),
            breaker: self.breaker(),
            gitlab: Gitlab::NotAsked,
            unknown_identity: self.unknown_identity,
            imported: None,
            imported_readers: self.readers.setting(),
            listed_reader: false,
        };
        (facts, remembered)
    }

    /// Decide, reading the module-wide records only when the answer can depend on them
    /// (GitLab failed or cannot be asked): the hit path reads nothing more from disk. `cred`
    /// is looked up in `offline.readers_file` only when an imported private answer is at
    /// stake.
    pub(super) async fn decide(
        &self,
        facts: &mut Facts,
        fallback: &Fallback<'_>,
        cred: Option<&HeaderValue>,
    ) -> (Action, Records) {
        let w = self.windows();
        let action = policy::decide(facts, &w);
        // Fresh answers, replays, holds and relays never depend on module-wide records.
        let may_fall_back = matches!(action, Action::Ask | Action::Stale(_) | Action::Refuse(_))
            && (facts.gitlab == Gitlab::Failed || facts.breaker != Breaker::Up);
        if !may_fall_back {
            return (action, Records::default());
        }
        let records = self.records(fallback, facts.breaker).await;
        facts.public = records.public.as_ref().map(|r| r.fetched_at);
        facts.shared = records.shared.as_ref().map(|r| r.fetched_at);
        facts.imported = records.imported.as_ref().map(|i| match i.public {
            true => Bundled::Public,
            false => Bundled::Private,
        });
        if facts.imported == Some(Bundled::Private)
            && facts.imported_readers == ImportedReaders::Listed
        {
            facts.listed_reader = self.readers.lists(cred).await;
        }
        (policy::decide(facts, &w), records)
    }

    async fn records(&self, fallback: &Fallback<'_>, breaker: Breaker) -> Records {
        let (module, op, version) = match fallback {
            Fallback::Listing { module, op } => (*module, *op, None),
            Fallback::Version { module, version } => (*module, &ListingKey::Versions, *version),
        };
        let shows = |r: &SharedListing| version.is_none_or(|v| r.versions.iter().any(|x| x == v));
        Records {
            public: self
                .shared(KIND_SHARED_PUBLIC, module, op)
                .await
                .filter(shows),
            shared: self.shared(KIND_SHARED, module, op).await.filter(shows),
            // Imported answers count only where no GitLab can be asked.
            imported: match breaker {
                Breaker::Offline => self
                    .cache
                    .records()
                    .get::<ImportedListing>(KIND_IMPORTED, shared_key(module, op))
                    .await
                    .filter(|i| shows(&i.listing)),
                _ => None,
            },
        }
    }
}

/// Count a decision, and log the refusals an operator may want to see.
pub(super) fn count(
    action: Action,
    identity: Identity,
    module: &ModuleId,
    failure: Option<Failure>,
) {
    match action {
        Action::Fresh | Action::Revalidate => metrics::decision(Decision::Granted),
        Action::Stale(source) => {
            metrics::STALE_SERVED.inc();
            metrics::decision(match source {
                StaleSource::Own => Decision::StaleGrant,
                StaleSource::Public => Decision::StalePublic,
                StaleSource::SharedAnyone => Decision::UnknownAnyone,
                StaleSource::SharedAuthenticated => Decision::UnknownAuthenticated,
                StaleSource::Imported => Decision::Imported,
            });
        }
        Action::Refuse(why) => {
            let d = match why {
                Why::UnknownDenied => Decision::UnknownDenied,
                Why::NotReader => Decision::NotReader,
                Why::RefusedBefore | Why::NothingCached => Decision::OfflineRefused,
            };
            metrics::decision(d);
            tracing::info!(
                identity = %identity.short(),
                module = %module,
                why = ?why,
                failure = ?failure,
                "GitLab failed and the cache has nothing this caller may have: refused"
            );
        }
        Action::Replay | Action::HoldBack | Action::Ask | Action::Relay => {}
    }
}

impl Registry {
    /// Carry out the decisions that answer the same on every route: replay GitLab's recent
    /// refusal, hold back a rate-limited caller, refuse while GitLab fails (a caller GitLab
    /// refused gets that refusal again, never an outage). `None` for the others, which the
    /// route answers itself.
    pub(super) async fn answer_alike(
        &self,
        action: Action,
        identity: Identity,
        module: &ModuleId,
        path: &str,
        failure: Option<Failure>,
    ) -> Option<(Reply, CacheStatus)> {
        match action {
            Action::Refuse(Why::RefusedBefore) => Some((
                self.replay_refusal(identity, module).await,
                CacheStatus::Hit,
            )),
            // `None` when it expired between the decision and now: GitLab answers then.
            Action::Replay => self
                .auth
                .negative(identity, path, crate::clock::instant())
                .map(|neg| (reply::negative(&neg), CacheStatus::Hit)),
            Action::HoldBack => {
                let wait = self
                    .auth
                    .held(identity, module, crate::clock::instant())
                    .unwrap_or_default();
                Some((reply::held_back(module, wait), CacheStatus::Miss))
            }
            Action::Refuse(why) => {
                let reply = match failure.unwrap_or_else(|| self.failure_without_asking()) {
                    // Not an outage: tfmirror refused GitLab's answer; say so as before.
                    Failure::Invalid(status) => Reply::error(status),
                    failure => reply::unavailable(module, why, failure),
                };
                Some((reply, CacheStatus::Miss))
            }
            _ => None,
        }
    }

    /// GitLab was asked, and the policy has nothing to serve (`action` is a refusal, or a
    /// stale answer whose body is gone): relay GitLab's own 5xx if it sent one, else say
    /// why in tfmirror's words. A caller GitLab refused before gets that refusal, never a
    /// 5xx: a tier in front would read the 5xx as an outage and serve it a stale copy.
    pub(super) async fn answer_failed(
        &self,
        action: Action,
        asked: Asked,
        identity: Identity,
        module: &ModuleId,
        path: &str,
    ) -> Reply {
        let action = match action {
            Action::Refuse(_) | Action::HoldBack | Action::Replay => action,
            _ => Action::Refuse(Why::NothingCached),
        };
        let relay_5xx = matches!(action, Action::Refuse(why) if why != Why::RefusedBefore);
        match asked {
            Asked::Failed {
                answer: Some(small),
                ..
            } if relay_5xx => reply::answer(&small, CacheStatus::Miss),
            asked => {
                let failure = asked.failure();
                match self
                    .answer_alike(action, identity, module, path, failure)
                    .await
                {
                    Some((reply, _)) => reply,
                    // A replayed refusal that expired meanwhile: GitLab failed, nothing to serve.
                    None => {
                        let failure = failure.unwrap_or(Failure::Unreachable);
                        reply::unavailable(module, Why::NothingCached, failure)
                    }
                }
            }
        }
    }

    /// GitLab's refusal of this identity for this module, as it was answered, replayed.
    pub(super) async fn replay_refusal(&self, identity: Identity, module: &ModuleId) -> Reply {
        let refusal = self.auth.refusal(identity, module).await;
        reply::refused(&refusal.unwrap_or_else(Refusal::forbidden))
    }

    /// The facts once GitLab was asked: what it did, and the breaker as this answer (or its
    /// absence) left it: a request whose failure opened it sees GitLab down.
    pub(super) fn after_asking(&self, facts: &mut Facts, asked: &Asked, lesson: &Lesson) {
        facts.gitlab = asked.gitlab(lesson);
        facts.breaker = self.breaker();
    }

    /// Why GitLab was not asked, when the policy refused before asking.
    pub(super) fn failure_without_asking(&self) -> Failure {
        if self.health.is_offline_mode() {
            Failure::Offline
        } else {
            Failure::BreakerOpen
        }
    }
}
