//! Listings and metadata (`versions`, latest, a version). Who gets which body is decided by
//! [`crate::access::policy`]; this file gathers the facts and carries the decision out.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use pingora::proxy::Session;
use pingora::Result;

use super::ask::Asked;
use super::decide::{count, Fallback, Records};
use super::reply::{authorization, write_answer, write_json, write_unavailable};
use super::{route_label, Lesson, Outcome, Registry};
use crate::access::policy::{Action, Kind, StaleSource};
use crate::cache::records::BodyRef;
use crate::clock::now as unix_now;
use crate::identity::Identity;
use crate::respond::CacheStatus;
use crate::routes::ModuleRoute;

impl Registry {
    #[allow(clippy::too_many_lines)] // TODO(issue 15): split with the policy rewrite
    pub(super) async fn listing(
        self: &Arc<Self>,
        session: &mut Session,
        route: &ModuleRoute,
        op: String,
    ) -> Result<Outcome> {
        let cred = authorization(session);
        let identity = self.secret.identify(cred.as_ref());
        let grant = self.auth.grant(identity, &route.module).await;
        let own = grant.as_ref().and_then(|g| g.bodies.get(&op).cloned());
        let path = route.upstream_path();
        let outcome = |cache, upstream_status| Outcome {
            cache,
            upstream_status,
            identity,
        };
        let now = unix_now();
        let mut facts = self.facts(
            now,
            Kind::Listing,
            identity,
            cred.is_some(),
            &route.module,
            grant.as_deref(),
            own.as_ref().map(|b| b.fetched_at),
            &path,
        );
        let fallback = Fallback::Listing {
            module: &route.module,
            op: &op,
        };
        let (action, records) = self.decide(&mut facts, &fallback).await;
        count(action, identity, &route.module, None);
        match action {
            Action::Fresh | Action::Revalidate => {
                let own = own
                    .as_ref()
                    .expect("the policy serves an own answer only if there is one");
                if let Some(body) = self.body(own).await {
                    let age = now.saturating_sub(own.fetched_at);
                    if let Some(g) = &grant {
                        self.auth.remember_for_grant(identity, cred.as_ref(), g);
                    }
                    let status = if action == Action::Fresh {
                        CacheStatus::Hit
                    } else {
                        self.refresh_in_background(identity, route, op.clone());
                        CacheStatus::Updating
                    };
                    write_json(session, status, age, false, body).await?;
                    return Ok(outcome(status, None));
                }
                // The body is gone from the store (evicted): GitLab answers instead.
            }
            Action::Stale(source) => {
                return self
                    .serve_stale_listing(
                        session,
                        source,
                        own.as_ref(),
                        &records,
                        identity,
                        route,
                        None,
                    )
                    .await;
            }
            other => {
                if let Some(cache) = self
                    .answer_alike(session, other, identity, &route.module, &path, None)
                    .await?
                {
                    return Ok(outcome(cache, None));
                }
            }
        }

        let lesson = Lesson::Listing {
            module: route.module.clone(),
            op: op.clone(),
            path: path.clone(),
            previous: own.clone(),
        };
        let asked = self
            .ask(
                identity,
                &path,
                cred.clone(),
                lesson.clone(),
                route_label(route),
            )
            .await;
        facts.gitlab = asked.gitlab(&lesson);
        let (action, records) = self.decide(&mut facts, &fallback).await;
        count(action, identity, &route.module, asked.failure());
        match (action, asked) {
            (Action::Stale(source), asked) => {
                let upstream = asked.upstream_status();
                self.serve_stale_listing(
                    session,
                    source,
                    own.as_ref(),
                    &records,
                    identity,
                    route,
                    upstream,
                )
                .await
            }
            (Action::Relay, Asked::Answer { small, learned }) => {
                write_answer(session, &small, learned).await?;
                Ok(outcome(learned, Some(small.status.as_u16())))
            }
            (action, asked) => {
                let upstream = asked.upstream_status();
                self.answer_failed(session, action, asked, identity, &route.module, &path)
                    .await?;
                Ok(outcome(CacheStatus::Miss, upstream))
            }
        }
    }

    /// Serve a stale listing body from `source`. When the body is gone from the store, the
    /// caller gets the same refusal as if nothing had been cached.
    #[allow(clippy::too_many_arguments)]
    async fn serve_stale_listing(
        &self,
        session: &mut Session,
        source: StaleSource,
        own: Option<&BodyRef>,
        records: &Records,
        identity: Identity,
        route: &ModuleRoute,
        upstream_status: Option<u16>,
    ) -> Result<Outcome> {
        let body_ref = match records.of(source) {
            None => own.cloned(),
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
        let cache = match body {
            Some((body, age)) => {
                write_json(session, CacheStatus::Stale, age, true, body).await?;
                CacheStatus::Stale
            }
            None => {
                let failure = self.failure_without_asking();
                let why = crate::access::policy::Why::NothingCached;
                write_unavailable(session, &route.module, why, failure).await?;
                CacheStatus::Miss
            }
        };
        Ok(Outcome {
            cache,
            upstream_status,
            identity,
        })
    }

    /// Refresh a listing with the caller's remembered credential, in the background
    /// (stale-while-revalidate). One refresh per (identity, path) at a time.
    fn refresh_in_background(
        self: &Arc<Self>,
        identity: Identity,
        route: &ModuleRoute,
        op: String,
    ) {
        let cred: Option<HeaderValue> = self.auth.credential(identity);
        let path = route.upstream_path();
        let key = format!("{}{path}", identity.to_hex());
        if !self
            .refreshing
            .lock()
            .expect("refresh lock")
            .insert(key.clone())
        {
            return; // one is already running
        }
        let this = self.clone();
        let module = route.module.clone();
        let label = route_label(route);
        tokio::spawn(async move {
            let previous = this
                .auth
                .grant(identity, &module)
                .await
                .and_then(|g| g.bodies.get(&op).cloned());
            let lesson = Lesson::Listing {
                module,
                op,
                path: path.clone(),
                previous,
            };
            // `ask` learns whatever comes back: a new body, or a refusal that revokes.
            let _ = this.ask(identity, &path, cred, lesson, label).await;
            this.refreshing.lock().expect("refresh lock").remove(&key);
        });
    }
}
