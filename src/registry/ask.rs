//! Asking GitLab: the breaker, the deadline, one shared request per (identity, path), and
//! what GitLab's answer teaches, even when it arrives after the caller stopped waiting.
//!
//! Slow is not down. A registry call waits for GitLab up to `offline.deadline` (below
//! Terraform's 10 s per registry call), whatever is cached; only then does it count as a
//! failure (for the breaker, and for the policy's stale path). The request itself keeps
//! going: when GitLab's answer arrives, it is learned as if it had come in time, so a late
//! 403 revokes before the caller's next request.

use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use http::{HeaderValue, StatusCode};
use pingora::ErrorType;

use super::{status_class, Lesson, Registry, SharedFetch};
use crate::access::policy::Gitlab;
use crate::flight::{Generation, Learned};
use crate::identity::Identity;
use crate::metrics;
use crate::respond::CacheStatus;
use crate::upstream::gitlab::{self, Small};

/// How long an answered fetch is offered to new requests at most, when no caller that waited
/// for it took it out after learning it (see `fetch_shared`).
pub(super) const ANSWERED_STAYS: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a request probing an open breaker waits for GitLab.
const PROBE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// Why GitLab gave no answer to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// Connection refused, reset, DNS: nothing reached GitLab.
    Unreachable,
    /// No answer within `offline.deadline`.
    Deadline,
    /// GitLab answered with this 5xx.
    Status(StatusCode),
    /// The breaker is open (or an upstream-wide `Retry-After` runs) and another request is
    /// already probing.
    BreakerOpen,
    /// `--offline`.
    Offline,
    /// GitLab answered something tfmirror will not take (over `limits.max_listing_size`,
    /// unreadable): answered with this status, GitLab-shaped, as before.
    Invalid(StatusCode),
}

/// What asking GitLab produced.
pub(super) enum Asked {
    /// GitLab answered in time; `learned` is what the answer did to the cache (MISS or
    /// REVALIDATED).
    Answer { small: Small, learned: CacheStatus },
    /// Nothing usable arrived in time; `answer` is GitLab's 5xx, if it sent one.
    Failed {
        failure: Failure,
        answer: Option<Small>,
    },
}

impl Asked {
    pub(super) fn failure(&self) -> Option<Failure> {
        match self {
            Asked::Failed { failure, .. } => Some(*failure),
            Asked::Answer { .. } => None,
        }
    }

    /// GitLab's status, for the access log, when it answered at all.
    pub(super) fn upstream_status(&self) -> Option<u16> {
        match self {
            Asked::Answer { small, .. }
            | Asked::Failed {
                answer: Some(small),
                ..
            } => Some(small.status.as_u16()),
            Asked::Failed { .. } => None,
        }
    }

    /// What GitLab did, in the policy's terms.
    pub(super) fn gitlab(&self, lesson: &Lesson) -> Gitlab {
        match self {
            Asked::Answer { small, .. } => gitlab_did(small.status, lesson),
            Asked::Failed { .. } => Gitlab::Failed,
        }
    }
}

/// Classify an answer. A 404 means "no access" on a project route's check (GitLab answers
/// `?terraform-get=1` after the access check, before looking the package up); elsewhere it
/// means "not found", an answer like any other.
pub(super) fn gitlab_did(status: StatusCode, lesson: &Lesson) -> Gitlab {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Gitlab::Refused,
        StatusCode::NOT_FOUND if matches!(lesson, Lesson::ProjectCheck { .. }) => Gitlab::Refused,
        StatusCode::TOO_MANY_REQUESTS => Gitlab::RateLimited,
        s if s.is_server_error() => Gitlab::Failed,
        _ => Gitlab::Answered,
    }
}

impl Registry {
    /// Ask GitLab for `path` with the caller's credential, and learn from the answer.
    ///
    /// With the breaker open, only one request at a time goes through (the probe); the rest
    /// fail at once. Past `offline.deadline` the caller gets `Failed(Deadline)`, and the
    /// answer, when it comes, is learned in the background.
    pub(super) async fn ask(
        self: &Arc<Self>,
        identity: Identity,
        path: &str,
        cred: Option<HeaderValue>,
        lesson: Lesson,
        label: &'static str,
    ) -> Asked {
        // A download answer carries GitLab's JWT wrapping the raw token: never shared.
        let share = match lesson {
            Lesson::Download { .. } => Share::Credential,
            _ => Share::Identity,
        };
        self.ask_as(identity, path, cred, lesson, label, share, None)
            .await
            .expect("only a caller that says when it read the store is told it is out of date")
    }

    /// [`ask`](Self::ask) for a caller that read its grant at `since`: [`Learned`] when
    /// GitLab's answer to the same question (a concurrent request of the same identity, or
    /// of another job of its principal) was learned after that. The caller then decides
    /// again from the grant store, which now holds what GitLab said, instead of asking GitLab
    /// the same thing again: a cold wave of jobs of one principal costs one question per
    /// module, however their requests interleave.
    pub(super) async fn ask_since(
        self: &Arc<Self>,
        identity: Identity,
        path: &str,
        cred: Option<HeaderValue>,
        lesson: Lesson,
        label: &'static str,
        since: Instant,
    ) -> Result<Asked, Learned> {
        self.ask_as(
            identity,
            path,
            cred,
            lesson,
            label,
            Share::Identity,
            Some(since),
        )
        .await
    }

    /// [`ask`](Self::ask), sharing the request per identity (a principal's jobs share one)
    /// or per credential. A 401 is a job token's own (its job is over): when a shared
    /// request of another job of the principal got one, this caller asks for itself.
    #[allow(clippy::too_many_arguments)]
    async fn ask_as(
        self: &Arc<Self>,
        identity: Identity,
        path: &str,
        cred: Option<HeaderValue>,
        lesson: Lesson,
        label: &'static str,
        share: Share,
        since: Option<Instant>,
    ) -> Result<Asked, Learned> {
        if self.health.is_offline_mode() {
            return Ok(failed(Failure::Offline));
        }
        if self.health.held() {
            return Ok(failed(Failure::BreakerOpen));
        }
        let probe = if self.health.unavailable() {
            match self.health.claim_probe() {
                Some(p) => Some(p),
                None => return Ok(failed(Failure::BreakerOpen)),
            }
        } else {
            None
        };
        let key = self.inflight_key(identity, cred.as_ref(), path, share);
        let (generation, mine, fut) =
            self.fetch_shared(&key, identity, path, cred.clone(), label, since)?;
        // A probe of an open breaker waits no longer than the background probe does: against
        // a black hole, every request that probes would otherwise cost the whole deadline.
        let deadline = match probe {
            Some(_) => self.deadline.min(PROBE_DEADLINE),
            None => self.deadline,
        };
        match tokio::time::timeout(deadline, fut.clone()).await {
            Ok(Ok(small)) if !mine && small.status == StatusCode::UNAUTHORIZED => {
                self.health.record_answer(small.status, &small.headers);
                drop(probe);
                let share = Share::Credential;
                let ask = self.ask_as(identity, path, cred, lesson, label, share, since);
                Box::pin(ask).await
            }
            Ok(Ok(small)) => {
                self.health.record_answer(small.status, &small.headers);
                let learned = self.learn(identity, cred.as_ref(), &lesson, &small).await;
                // Offered to no one now; a request that read its grant before this
                // learning is told so, and reads it again (`ask_since`).
                self.inflight.learned(&key.to_string(), generation);
                Ok(match small.status {
                    s if s.is_server_error() => Asked::Failed {
                        failure: Failure::Status(s),
                        answer: Some(small),
                    },
                    _ => Asked::Answer { small, learned },
                })
            }
            Ok(Err(e)) => {
                self.leave_inflight(&key, generation);
                Ok(self.failed_call(&e))
            }
            Err(_) => {
                // Slow past the deadline: failed for this caller, and for the breaker. The
                // answer is still learned when it arrives. Later requests must not join this
                // one (a black hole would hold them until `timeouts.read`): they start afresh.
                self.health.record_failure(&self.upstream);
                self.leave_inflight(&key, generation);
                self.learn_late(identity, cred, lesson, fut, mine);
                Ok(failed(Failure::Deadline))
            }
        }
    }

    /// A registry call that got no HTTP answer: breaker material when GitLab could not be
    /// reached or did not answer; otherwise (an answer tfmirror will not take) not an outage.
    fn failed_call(&self, e: &pingora::Error) -> Asked {
        tracing::warn!(error = %e, "upstream registry call failed");
        if !is_unreachable(e.etype()) {
            return failed(Failure::Invalid(gitlab::failure_status(e)));
        }
        self.health.record_failure(&self.upstream);
        let timed_out = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::ConnectTimedout
        );
        failed(if timed_out {
            Failure::Deadline
        } else {
            Failure::Unreachable
        })
    }

    /// Learn GitLab's answer to a call whose caller stopped waiting at the deadline.
    fn learn_late(
        self: &Arc<Self>,
        identity: Identity,
        cred: Option<HeaderValue>,
        lesson: Lesson,
        fut: SharedFetch,
        mine: bool,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Ok(small) = fut.await {
                this.health.record_answer(small.status, &small.headers);
                if !mine && small.status == StatusCode::UNAUTHORIZED {
                    return; // another job's 401: says nothing of this caller's token
                }
                this.learn(identity, cred.as_ref(), &lesson, &small).await;
                metrics::LATE_ANSWERS.inc();
                tracing::info!(
                    identity = %identity.short(),
                    status = small.status.as_u16(),
                    "learned an upstream answer that came after the deadline"
                );
            }
        });
    }

    /// GET a registry path upstream; concurrent identical requests of one identity share it
    /// (one flight, `crate::flight`), which runs as a task of its own: a caller that stops
    /// waiting (deadline, client gone) does not cancel it for the others, and its answer can
    /// still be learned.
    ///
    /// Returns whether the request is made with this caller's own credential.
    fn fetch_shared(
        &self,
        key: &str,
        identity: Identity,
        path: &str,
        cred: Option<HeaderValue>,
        label: &'static str,
        since: Option<Instant>,
    ) -> Result<(Generation, bool, SharedFetch), Learned> {
        let me = self.secret.identify(cred.as_ref());
        let principal = self.is_principal_of(identity, cred.as_ref());
        let upstream = self.upstream.clone();
        let path = path.to_string();
        let start = move || {
            async move {
                let started = Instant::now();
                // What the answer says held at some point after this, never before.
                let sent_ms = crate::clock::now_ms();
                let result = upstream
                    .registry(&path, cred.as_ref())
                    .await
                    .map(|small| Small { sent_ms, ..small });
                metrics::UPSTREAM_DURATION
                    .with_label_values(&[label])
                    .observe(started.elapsed().as_secs_f64());
                let outcome = match &result {
                    Ok(s) => status_class(s.status),
                    Err(e) if e.etype() == &ErrorType::ReadTimedout => "timeout",
                    Err(_) => "error",
                };
                metrics::UPSTREAM_REQUESTS
                    .with_label_values(&[label, outcome])
                    .inc();
                result.map_err(Arc::from)
            }
            .boxed()
        };
        // The callers that wait for an answer learn it, then take it out (`leave_inflight`);
        // until then a request that joins gets this answer rather than asking again a
        // request whose answer is about to be learned. Should every caller have stopped
        // waiting, it leaves by itself after `ANSWERED_STAYS` (the table's linger).
        let (generation, flight, joined) = match since {
            Some(since) => self
                .inflight
                .join_or_start_since(key.to_string(), me, since, start)?,
            None => self.inflight.join_or_start(key.to_string(), me, start),
        };
        let mine = match joined {
            None => true,
            Some(owner) => {
                metrics::COALESCED_WAITS.inc();
                owner == me || !principal
            }
        };
        Ok((generation, mine, flight))
    }

    /// Stop offering an in-flight fetch to new requests (it goes on for those that hold it).
    fn leave_inflight(&self, key: &str, generation: Generation) {
        self.inflight.leave(&key.to_string(), generation);
    }

    /// Concurrent identical requests share one fetch per identity (the jobs of a principal
    /// share one), or per credential (`Share::Credential`).
    fn inflight_key(
        &self,
        identity: Identity,
        cred: Option<&HeaderValue>,
        path: &str,
        share: Share,
    ) -> String {
        let who = match share {
            Share::Credential if self.is_principal_of(identity, cred) => self.secret.identify(cred),
            _ => identity,
        };
        format!("{}{path}", who.to_hex())
    }
}

/// What concurrent identical requests share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Share {
    Identity,
    Credential,
}

fn failed(failure: Failure) -> Asked {
    Asked::Failed {
        failure,
        answer: None,
    }
}

/// Errors that say GitLab could not be reached or did not answer (breaker material).
pub(super) fn is_unreachable(e: &ErrorType) -> bool {
    matches!(
        e,
        ErrorType::ConnectError
            | ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ReadTimedout
            | ErrorType::ReadError
    )
}
