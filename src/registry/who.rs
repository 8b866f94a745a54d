//! Who asks: a request's credential resolved to the identity its grants are kept under.
//!
//! Any credential is its own identity (a keyed hash), except a CI job token under
//! `auth.principal_grants`: one `GET /api/v4/job` per job (through the same adapter, breaker
//! and deadline as every registry call; concurrent requests of one token share it) maps the
//! token to its principal P, and P's identity is used for grants, refusals and download
//! tokens. The decisions are pure code in [`crate::access::principal`]; this is the I/O.
//!
//! Facts tied to one token stay with the token: GitLab's `/file` JWT (it wraps the raw token,
//! see `remember_gitlab_jwt` callers: keyed by the token's own identity), the credential a
//! refresh or a fill uses (the request's own), and a 401 (the job is over: its mapping is
//! replaced by GitLab's 401, P's grants stand).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use http::{header, HeaderValue, StatusCode};

use super::{reply, Registry};
use crate::access::principal::{self, IdToken, JobAnswer, Known, Mapping, Resolved};
use crate::access::Negative;
use crate::identity::Identity;
use crate::metrics;
use crate::respond::Reply;
use crate::upstream::gitlab::Fetcher;
use crate::upstream::health::Health;

/// GitLab's job endpoint: 200 while the job runs, 401 once it is over.
pub(super) const JOB_PATH: &str = "/api/v4/job";

/// In-flight `/api/v4/job` requests, per token identity (`crate::flight`).
pub(super) type JobInflight = crate::flight::Flights<Identity, (JobAnswer, Option<Negative>)>;

/// A request's caller.
pub(super) enum Who {
    /// `identity` keeps the grants; `cred` is what GitLab is asked with.
    Caller {
        identity: Identity,
        cred: Option<HeaderValue>,
    },
    /// A job token whose job is over: GitLab's 401, as it answered it.
    Finished { token: Identity, reply: Reply },
}

impl Registry {
    /// Resolve the caller of a request presenting `authorization`.
    pub(super) async fn who(
        &self,
        authorization: Option<&HeaderValue>,
        id_token: Option<&str>,
    ) -> Who {
        let Some(cred) = authorization else {
            return Who::Caller {
                identity: Identity::ANONYMOUS,
                cred: None,
            };
        };
        let cred_id = self.secret.identify(Some(cred));
        let caller = |identity| Who::Caller {
            identity,
            cred: Some(cred.clone()),
        };
        if !self.principal_grants {
            return caller(cred_id);
        }
        let Some(token) = principal::job_token(cred) else {
            return caller(cred_id);
        };
        // The job's token, however it came (Bearer, or Basic on project routes): one mapping.
        let token_id = self.token_identity(&token);
        let who = match self.jobs.get(token_id) {
            Some(Known::Principal(p)) => Ok(Some(p)),
            Some(Known::PerToken) => Ok(None),
            Some(Known::Finished(n)) => Err(reply::negative(&n)),
            None => self.map_new_job(token_id, token, id_token).await,
        };
        match who {
            Ok(identity) => caller(identity.unwrap_or(cred_id)),
            Err(reply) => Who::Finished {
                token: token_id,
                reply,
            },
        }
    }

    /// A job token not seen (lately): ask GitLab about its job, check its ID token, and
    /// remember what that makes of it. `Ok(None)`: the credential's own identity.
    async fn map_new_job(
        &self,
        token_id: Identity,
        token: String,
        id_token: Option<&str>,
    ) -> Result<Option<Identity>, Reply> {
        let form = principal::form(&token);
        if !principal::ask_gitlab(form) {
            self.jobs.insert(token_id, Known::PerToken);
            return Ok(None);
        }
        if let Some(keys) = &self.id_keys {
            keys.refresh_if_due(&self.upstream, &self.health);
        }
        let (generation, (answer, refusal)) = self.ask_job(token_id, token).await;
        let id = self.check_id_token(id_token, answer).await;
        let who = match principal::resolve(form, answer, id) {
            Resolved::Mapped(mapping) => self.map_job(token_id, mapping, refusal),
            Resolved::Offline(p) => {
                metrics::decision(metrics::Decision::IdTokenOffline);
                Ok(Some(p.identity(&self.secret)))
            }
            Resolved::Mismatch => {
                tracing::info!(
                    "a CI ID token names another job project or user than GitLab: refused"
                );
                Err(reply::negative(&unauthorized()))
            }
        };
        // Only now: a request arriving between the answer and its mapping would ask again.
        self.job_inflight.leave(&token_id, generation);
        who
    }

    /// The caller of a registry request: its identity and credential, or the answer for a
    /// finished job.
    pub(super) async fn caller(
        &self,
        call: &super::Call,
    ) -> std::result::Result<(Identity, Option<HeaderValue>), (Reply, super::Outcome)> {
        self.who(call.authorization.as_ref(), call.id_token.as_deref())
            .await
            .caller()
    }

    /// Remember what GitLab's answer made of a job token: the identity to use, or the 401
    /// to answer (`None`: the credential's own identity).
    fn map_job(
        &self,
        token_id: Identity,
        mapping: Mapping,
        refusal: Option<Negative>,
    ) -> Result<Option<Identity>, Reply> {
        match mapping {
            Mapping::Principal(p) => {
                let id = p.identity(&self.secret);
                self.jobs.insert(token_id, Known::Principal(id));
                Ok(Some(id))
            }
            Mapping::PerToken => {
                self.jobs.insert(token_id, Known::PerToken);
                Ok(None)
            }
            Mapping::Finished => {
                let n = refusal.unwrap_or_else(unauthorized);
                let reply = reply::negative(&n);
                self.jobs.insert(token_id, Known::Finished(n));
                Err(reply)
            }
            Mapping::Unknown => Ok(None),
        }
    }

    /// Verify the ID token that came with a job token, when it can matter: GitLab answered
    /// about the job (the ID token must agree), or could not be asked (it stands in).
    async fn check_id_token(&self, id_token: Option<&str>, answer: JobAnswer) -> IdToken {
        let (Some(keys), Some(token)) = (&self.id_keys, id_token) else {
            return IdToken::Absent;
        };
        if !matches!(answer, JobAnswer::Running(Some(_)) | JobAnswer::Failed) {
            return IdToken::Absent;
        }
        match keys.verify(token, &self.upstream, &self.health).await {
            Ok(c) => IdToken::Verified {
                job_project_id: c.job_project_id,
                user_id: c.user_id,
            },
            Err(why) => {
                // Why, never the token.
                tracing::info!(why = ?why, "a CI ID token was not taken");
                IdToken::Rejected
            }
        }
    }

    /// A job token GitLab answered 401 for on a registry route: its job is over. Its mapping
    /// becomes that 401 (P's grants stand: the refusal is the token's, not P's).
    pub(super) fn job_finished(&self, cred: &HeaderValue, refusal: Negative) {
        if let Some(token) = principal::job_token(cred) {
            let token_id = self.token_identity(&token);
            self.jobs.insert(token_id, Known::Finished(refusal));
        }
    }

    /// The identity a job token is mapped under: that of `Bearer <token>`, whichever way the
    /// request carried it.
    fn token_identity(&self, token: &str) -> Identity {
        match HeaderValue::from_str(&format!("Bearer {token}")) {
            Ok(v) => self.secret.identify(Some(&v)),
            Err(_) => Identity::ANONYMOUS,
        }
    }

    /// Is `identity` a principal's, shared by the job token `cred`, rather than `cred`'s own?
    pub(super) fn is_principal_of(&self, identity: Identity, cred: Option<&HeaderValue>) -> bool {
        self.principal_grants
            && cred.is_some_and(|c| {
                principal::job_token(c).is_some() && self.secret.identify(Some(c)) != identity
            })
    }

    /// `GET /api/v4/job` with the job token, shared by concurrent requests of that token;
    /// offered until the caller that mapped its answer leaves it (or `ANSWERED_STAYS`).
    async fn ask_job(
        &self,
        token_id: Identity,
        token: String,
    ) -> (crate::flight::Generation, (JobAnswer, Option<Negative>)) {
        let (upstream, health, deadline) =
            (self.upstream.clone(), self.health.clone(), self.deadline);
        let start = move || job_answer(upstream, health, deadline, token).boxed();
        let (generation, flight, _) = self.job_inflight.join_or_start(token_id, (), start);
        (generation, flight.await)
    }
}

/// Ask GitLab about a job, unless the breaker says it cannot be asked.
async fn job_answer(
    upstream: Arc<dyn Fetcher>,
    health: Arc<Health>,
    deadline: Duration,
    token: String,
) -> (JobAnswer, Option<Negative>) {
    if health.is_offline_mode() || health.held() || health.unavailable() {
        return (JobAnswer::Failed, None);
    }
    let Ok(auth) = HeaderValue::from_str(&format!("Bearer {token}")) else {
        return (JobAnswer::Other, None);
    };
    let started = Instant::now();
    let result = tokio::time::timeout(deadline, upstream.registry(JOB_PATH, Some(&auth))).await;
    metrics::UPSTREAM_DURATION
        .with_label_values(&["job"])
        .observe(started.elapsed().as_secs_f64());
    let (outcome, answer) = match result {
        Ok(Ok(small)) => {
            health.record_answer(small.status, &small.headers);
            let answer = match small.status {
                StatusCode::OK => (JobAnswer::Running(principal::parse_job(&small.body)), None),
                StatusCode::UNAUTHORIZED => {
                    let n = Negative {
                        status: small.status,
                        www_authenticate: small.headers.get(header::WWW_AUTHENTICATE).cloned(),
                        body: small.body.clone(),
                    };
                    (JobAnswer::Unauthorized, Some(n))
                }
                s if s.is_server_error() => (JobAnswer::Failed, None),
                _ => (JobAnswer::Other, None),
            };
            (super::status_class(small.status), answer)
        }
        Ok(Err(e)) => {
            if super::ask::is_unreachable(e.etype()) {
                health.record_failure(&upstream);
            }
            ("error", (JobAnswer::Failed, None))
        }
        Err(_) => {
            health.record_failure(&upstream);
            ("timeout", (JobAnswer::Failed, None))
        }
    };
    metrics::UPSTREAM_REQUESTS
        .with_label_values(&["job", outcome])
        .inc();
    answer
}

/// GitLab's plain 401, when tfmirror refuses a job token itself.
fn unauthorized() -> Negative {
    Negative {
        status: StatusCode::UNAUTHORIZED,
        www_authenticate: None,
        body: bytes::Bytes::from_static(br#"{"message":"401 Unauthorized"}"#),
    }
}

impl Who {
    /// The caller's identity and credential, or the answer for a finished job.
    pub(super) fn caller(
        self,
    ) -> std::result::Result<(Identity, Option<HeaderValue>), (Reply, super::Outcome)> {
        match self {
            Who::Caller { identity, cred } => Ok((identity, cred)),
            Who::Finished { token, reply } => {
                let out = super::Outcome::new(token, crate::respond::CacheStatus::Miss, None);
                Err((reply, out))
            }
        }
    }
}
