//! Listings and metadata (`versions`, latest, a version). Who gets which body is decided by
//! [`crate::access::policy`]; this file gathers the facts and carries the decision out.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::HeaderValue;

use super::ask::Asked;
use super::decide::{count, Fallback, Records};
use super::reply;
use super::{route_label, Call, Lesson, Outcome, Registry};
use crate::access::policy::{Action, Kind, StaleSource};
use crate::cache::records::{BodyRef, Grant, ListingKey};
use crate::clock::now as unix_now;
use crate::clock::Moment;
use crate::identity::Identity;
use crate::respond::{CacheStatus, Reply};
use crate::routes::ModuleRoute;

/// One listing request, its facts gathered once.
struct Request<'a> {
    route: &'a ModuleRoute,
    op: ListingKey,
    cred: Option<HeaderValue>,
    identity: Identity,
    grant: Option<Arc<Grant>>,
    /// The body this identity last received for this listing.
    own: Option<BodyRef>,
    path: String,
    now: u64,
    /// When the grant was read, on a first look; `None` on a second (see `ask_since`).
    read_at: Option<Instant>,
}

impl Request<'_> {
    fn outcome(&self, cache: CacheStatus, upstream_status: Option<u16>) -> Outcome {
        Outcome::new(self.identity, cache, upstream_status)
    }

    fn fallback(&self) -> Fallback<'_> {
        Fallback::Listing {
            module: &self.route.module,
            op: &self.op,
        }
    }
}

impl Registry {
    pub(super) async fn listing(
        self: &Arc<Self>,
        call: &Call,
        route: &ModuleRoute,
        op: ListingKey,
    ) -> (Reply, Outcome) {
        self.look(call, route, op, true).await
    }

    /// One look at a listing request: the grant, the decision, GitLab if it must be asked.
    /// A first look that finds GitLab's answer to the same question learned while it was
    /// deciding takes a second look (at most), from the grant store as it is then.
    async fn look(
        self: &Arc<Self>,
        call: &Call,
        route: &ModuleRoute,
        op: ListingKey,
        first: bool,
    ) -> (Reply, Outcome) {
        let moment = Moment::now();
        let (identity, cred) = match self.caller(call).await {
            Ok(caller) => caller,
            Err(finished) => return finished,
        };
        let read_at = first.then(Instant::now);
        let grant = self.auth.grant(identity, &route.module).await;
        let own = grant
            .as_ref()
            .and_then(|g| g.bodies.get(&*op.as_str()).cloned());
        let req = Request {
            route,
            op,
            cred,
            identity,
            grant,
            own,
            path: route.upstream_path(),
            now: moment.unix,
            read_at,
        };
        let (mut facts, remembered) = self.facts(
            moment,
            Kind::Listing,
            identity,
            req.cred.is_some(),
            &route.module,
            req.grant.as_deref(),
            req.own.as_ref().map(|b| b.fetched_at),
            &req.path,
        );
        let (action, records) = self
            .decide(&mut facts, &req.fallback(), req.cred.as_ref())
            .await;
        count(action, identity, &route.module, None);
        if let Some(answered) = self
            .listing_without_asking(&req, action, &records, remembered.as_ref())
            .await
        {
            return answered;
        }
        match self.listing_from_gitlab(&req, facts).await {
            Some(answered) => answered,
            None => Box::pin(self.look(call, route, req.op.clone(), false)).await,
        }
    }

    /// Carry out a decision made before asking GitLab; `None` when GitLab must be asked.
    async fn listing_without_asking(
        self: &Arc<Self>,
        req: &Request<'_>,
        action: Action,
        records: &Records,
        remembered: Option<&HeaderValue>,
    ) -> Option<(Reply, Outcome)> {
        match action {
            Action::Fresh | Action::Revalidate => {
                let own = req
                    .own
                    .as_ref()
                    .expect("the policy serves an own answer only if there is one");
                // The body may be gone from the store (evicted): GitLab answers instead.
                let body = self.body(own).await?;
                if let Some(g) = &req.grant {
                    self.auth
                        .remember_for_grant(req.identity, req.cred.as_ref(), remembered, g);
                }
                let status = if action == Action::Fresh {
                    CacheStatus::Hit
                } else {
                    let cred = req.cred.clone();
                    self.refresh_in_background(req.identity, cred, req.route, req.op.clone());
                    CacheStatus::Updating
                };
                let age = req.now.saturating_sub(own.fetched_at);
                Some((
                    reply::json(status, age, false, body),
                    req.outcome(status, None),
                ))
            }
            Action::Stale(source) => {
                Some(self.serve_stale_listing(req, source, records, None).await)
            }
            other => self
                .answer_alike(other, req.identity, &req.route.module, &req.path, None)
                .await
                .map(|(reply, cache)| (reply, req.outcome(cache, None))),
        }
    }

    /// Ask GitLab, then decide again with what it did; `None` when what GitLab said was
    /// learned since the grant was read (look again instead).
    async fn listing_from_gitlab(
        self: &Arc<Self>,
        req: &Request<'_>,
        mut facts: crate::access::policy::Facts,
    ) -> Option<(Reply, Outcome)> {
        let lesson = Lesson::Listing {
            module: req.route.module.clone(),
            op: req.op.clone(),
            path: req.path.clone(),
            previous: req.own.clone(),
        };
        let label = route_label(req.route);
        let (id, path, cred) = (req.identity, &req.path, req.cred.clone());
        let asked = match req.read_at {
            Some(since) => {
                let ask = self.ask_since(id, path, cred, lesson.clone(), label, since);
                ask.await.ok()?
            }
            None => self.ask(id, path, cred, lesson.clone(), label).await,
        };
        self.after_asking(&mut facts, &asked, &lesson);
        let (action, records) = self
            .decide(&mut facts, &req.fallback(), req.cred.as_ref())
            .await;
        count(action, req.identity, &req.route.module, asked.failure());
        let upstream = asked.upstream_status();
        Some(match (action, asked) {
            (Action::Stale(source), _) => {
                self.serve_stale_listing(req, source, &records, upstream)
                    .await
            }
            (Action::Relay, Asked::Answer { small, learned }) => (
                reply::answer(&small, learned),
                req.outcome(learned, upstream),
            ),
            (action, asked) => {
                let (id, module) = (req.identity, &req.route.module);
                let reply = self
                    .answer_failed(action, asked, id, module, &req.path)
                    .await;
                (reply, req.outcome(CacheStatus::Miss, upstream))
            }
        })
    }

    /// Serve a stale listing body from `source`. When the body is gone from the store, the
    /// caller gets the same refusal as if nothing had been cached.
    async fn serve_stale_listing(
        &self,
        req: &Request<'_>,
        source: StaleSource,
        records: &Records,
        upstream_status: Option<u16>,
    ) -> (Reply, Outcome) {
        let body_ref = match records.of(source) {
            None => req.own.clone(),
            Some(r) => Some(BodyRef {
                digest: r.digest.clone(),
                fetched_at: r.fetched_at,
            }),
        };
        let body: Option<(Bytes, u64)> = match &body_ref {
            Some(r) => self
                .body(r)
                .await
                .map(|b| (b, unix_now().saturating_sub(r.fetched_at))),
            None => None,
        };
        match body {
            Some((body, age)) => (
                reply::json(CacheStatus::Stale, age, true, body),
                req.outcome(CacheStatus::Stale, upstream_status),
            ),
            None => {
                let failure = self.failure_without_asking();
                let why = crate::access::policy::Why::NothingCached;
                (
                    reply::unavailable(&req.route.module, why, failure),
                    req.outcome(CacheStatus::Miss, upstream_status),
                )
            }
        }
    }

    /// Refresh a listing in the background (stale-while-revalidate) with `cred`, the
    /// credential of the request that found the listing stale: never one looked up again (it
    /// may have been evicted meanwhile, and asking without one would have GitLab's 401
    /// revoke the caller). No credential, no refresh, unless the caller is anonymous. One
    /// refresh per (identity, path) at a time.
    pub(super) fn refresh_in_background(
        self: &Arc<Self>,
        identity: Identity,
        cred: Option<HeaderValue>,
        route: &ModuleRoute,
        op: ListingKey,
    ) {
        if cred.is_none() && !identity.is_anonymous() {
            return;
        }
        let path = route.upstream_path();
        let key = format!("{}{path}", identity.to_hex());
        let Some(running) = self.refreshing.try_start(key) else {
            return; // one is already running
        };
        let this = self.clone();
        let module = route.module.clone();
        let label = route_label(route);
        tokio::spawn(async move {
            let previous = this
                .auth
                .grant(identity, &module)
                .await
                .and_then(|g| g.bodies.get(&*op.as_str()).cloned());
            let lesson = Lesson::Listing {
                module,
                op,
                path: path.clone(),
                previous,
            };
            // `ask` learns whatever comes back: a new body, or a refusal that revokes.
            let _ = this.ask(identity, &path, cred, lesson, label).await;
            drop(running);
        });
    }
}
