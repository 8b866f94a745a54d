//! CI job tokens and their principal, as pure code.
//!
//! A job token acts as its job's user inside its job project's token scope: for a package read,
//! two jobs of one principal **P = (job project, user, scoped user)** have the same access at
//! the same moment (`/work/shared/PROTOCOL.md`, "CI job tokens"). Grants are therefore learned
//! and kept per P, and every job token of P uses them; one `GET /api/v4/job` per job maps its
//! token to P. What decides here:
//! - which credentials are job tokens at all ([`job_token`]): Bearer `glcbt-...`, or Basic
//!   `gitlab-ci-token:glcbt-...` (project routes); anything else keeps per-token grants;
//! - the token's form ([`form`]): legacy, or a JWT whose payload tfmirror reads (never
//!   verifies: GitLab does, and only GitLab's yes makes its claims count); a JWT with claims
//!   tfmirror does not know keeps per-token grants (GitLab plans finer job-token permissions:
//!   fail closed);
//! - what GitLab's answer to `/api/v4/job` makes of it ([`mapping`]).

use std::time::{Duration, Instant};

use base64::Engine;
use http::HeaderValue;

use super::grants::Negative;
use crate::identity::{Identity, Secret};

/// GitLab's job token prefix (16.9+).
pub const JOB_TOKEN_PREFIX: &str = "glcbt-";
/// The username GitLab takes a job token with in Basic auth.
const BASIC_USER: &str = "gitlab-ci-token";
/// Claims of a JWT-form job token that tfmirror knows carry no permission of their own
/// (GitLab's `Ci::JobToken::Jwt`: the registered claims, `cell_id`, `organization_id`, and
/// `scoped_user_id`, which is part of P).
const KNOWN_CLAIMS: &[&str] = &[
    "iss",
    "aud",
    "sub",
    "exp",
    "iat",
    "nbf",
    "jti",
    "cell_id",
    "organization_id",
    "scoped_user_id",
];
/// The longest job token considered (GitLab's JWT-form ones are well under 2 KiB).
const MAX_TOKEN: usize = 8 * 1024;

/// The job token a credential carries, if it is one: `Bearer glcbt-...`, or Basic
/// `gitlab-ci-token:glcbt-...`. Both route families of one job share its principal.
pub fn job_token(authorization: &HeaderValue) -> Option<String> {
    let v = authorization.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    let token = if scheme.eq_ignore_ascii_case("bearer") {
        rest.trim().to_string()
    } else if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (user, password) = text.split_once(':')?;
        if user != BASIC_USER {
            return None;
        }
        password.to_string()
    } else {
        return None;
    };
    (token.starts_with(JOB_TOKEN_PREFIX) && token.len() <= MAX_TOKEN).then_some(token)
}

/// Basic credentials with GitLab's job-token user name (`gitlab-ci-token:<token>`), whatever
/// the token's form: a legacy job token has no `glcbt-` prefix to know it by.
pub fn is_basic_job_user(authorization: &HeaderValue) -> bool {
    let Some((scheme, rest)) = authorization.to_str().ok().and_then(|v| v.split_once(' ')) else {
        return false;
    };
    scheme.eq_ignore_ascii_case("basic")
        && base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()
            .is_some_and(|raw| {
                raw.starts_with(BASIC_USER.as_bytes()) && raw.get(BASIC_USER.len()) == Some(&b':')
            })
}

/// The form of a job token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `glcbt-` and an opaque rest.
    Legacy,
    /// `glcbt-` and a JWT with known claims only; `scoped_user_id` for composite identities.
    Jwt { scoped_user_id: Option<u64> },
    /// A JWT carrying a claim tfmirror does not know: per-token grants.
    UnknownClaims,
}

/// Read a job token's form (its payload is read, not verified: see the module docs).
pub fn form(token: &str) -> Form {
    let rest = token.strip_prefix(JOB_TOKEN_PREFIX).unwrap_or(token);
    let parts: Vec<&str> = rest.split('.').collect();
    if parts.len() != 3 {
        return Form::Legacy;
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let Some(payload) = b64
        .decode(parts[1])
        .ok()
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok())
    else {
        // Three dot-separated pieces that are no JWT: an opaque token as far as we can tell.
        return Form::Legacy;
    };
    let Some(claims) = payload.as_object() else {
        return Form::UnknownClaims;
    };
    if claims.keys().any(|k| !KNOWN_CLAIMS.contains(&k.as_str())) {
        return Form::UnknownClaims;
    }
    match claims.get("scoped_user_id") {
        None | Some(serde_json::Value::Null) => Form::Jwt {
            scoped_user_id: None,
        },
        Some(v) => match decimal(v) {
            Some(id) => Form::Jwt {
                scoped_user_id: Some(id),
            },
            None => Form::UnknownClaims,
        },
    }
}

/// An id GitLab may send as a number or as a decimal string.
pub fn decimal(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()
        }
        _ => None,
    }
}

/// What `GET /api/v4/job` says of a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    pub project_id: u64,
    pub user_id: u64,
    pub bot: bool,
}

/// Read `/api/v4/job`'s 200 body: `pipeline.project_id`, `user.id`, `user.bot`.
pub fn parse_job(body: &[u8]) -> Option<Job> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(Job {
        project_id: v["pipeline"]["project_id"].as_u64()?,
        user_id: v["user"]["id"].as_u64()?,
        bot: v["user"]["bot"].as_bool().unwrap_or(false),
    })
}

/// A principal: whose grants a job token uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Principal {
    pub job_project_id: u64,
    pub user_id: u64,
    pub scoped_user_id: Option<u64>,
}

impl Principal {
    /// The identity P's grants are kept under (a keyed hash, like any identity).
    pub fn identity(&self, secret: &Secret) -> Identity {
        secret.identify_principal(self.job_project_id, self.user_id, self.scoped_user_id)
    }
}

/// What GitLab answered to `/api/v4/job` (or that it could not be asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAnswer {
    /// 200, with the body read (`None`: a body without the fields).
    Running(Option<Job>),
    /// 401: the job is over, or the token revoked.
    Unauthorized,
    /// GitLab cannot be asked: down, breaker open, deadline passed, 5xx, `--offline`.
    Failed,
    /// Any other answer (403, 429, ...).
    Other,
}

/// What a job token maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// P's grants (remembered for at most `auth.grant_ttl`).
    Principal(Principal),
    /// Grants of this token alone (remembered for at most `auth.grant_ttl`).
    PerToken,
    /// GitLab's 401: answered with it, nothing asked for this token any more.
    Finished,
    /// GitLab did not say: per token for this request, and asked again next time.
    Unknown,
}

/// Is `/api/v4/job` worth asking for a token of this form? Not when the answer cannot make
/// it a principal anyway.
pub fn ask_gitlab(form: Form) -> bool {
    form != Form::UnknownClaims
}

/// The mapping GitLab's answer gives a token of `form`.
pub fn mapping(form: Form, answer: JobAnswer) -> Mapping {
    match (form, answer) {
        (_, JobAnswer::Unauthorized) => Mapping::Finished,
        (Form::UnknownClaims, _) => Mapping::PerToken,
        (_, JobAnswer::Other | JobAnswer::Failed) => Mapping::Unknown,
        (_, JobAnswer::Running(None)) => Mapping::PerToken,
        // A legacy token of a bot user says nothing of a composite identity: per token.
        (Form::Legacy, JobAnswer::Running(Some(j))) if j.bot => Mapping::PerToken,
        (Form::Legacy, JobAnswer::Running(Some(j))) => Mapping::Principal(Principal {
            job_project_id: j.project_id,
            user_id: j.user_id,
            scoped_user_id: None,
        }),
        (Form::Jwt { scoped_user_id }, JobAnswer::Running(Some(j))) => {
            Mapping::Principal(Principal {
                job_project_id: j.project_id,
                user_id: j.user_id,
                scoped_user_id,
            })
        }
    }
}

/// What the CI ID token a job token came with says, if ID tokens are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdToken {
    /// None came, or ID tokens are off (`auth.id_token.audience` unset).
    Absent,
    /// Verified (signature, `aud`, `iss`, `exp`, `nbf`): its job project and user.
    Verified { job_project_id: u64, user_id: u64 },
    /// Present, but not verified: gives nothing.
    Rejected,
}

/// Who a job token's request is, all told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// As GitLab's answer maps it.
    Mapped(Mapping),
    /// The ID token names another job project or user than GitLab's `/api/v4/job`: a 401.
    Mismatch,
    /// GitLab cannot be asked; a verified ID token stands in for `/api/v4/job`: this
    /// principal (never remembered: GitLab decides again once it can be asked).
    Offline(Principal),
}

/// Combine GitLab's answer about the job and the ID token that came with it.
pub fn resolve(form: Form, answer: JobAnswer, id: IdToken) -> Resolved {
    let mapped = mapping(form, answer);
    match (answer, id) {
        (
            JobAnswer::Running(Some(job)),
            IdToken::Verified {
                job_project_id,
                user_id,
            },
        ) if (job.project_id, job.user_id) != (job_project_id, user_id) => Resolved::Mismatch,
        // Only when GitLab cannot be asked; and never for a token tfmirror would not map
        // to a principal (unknown claims: not asked at all, so never `Failed`).
        (
            JobAnswer::Failed,
            IdToken::Verified {
                job_project_id,
                user_id,
            },
        ) if form != Form::UnknownClaims => Resolved::Offline(Principal {
            job_project_id,
            user_id,
            scoped_user_id: None,
        }),
        _ => Resolved::Mapped(mapped),
    }
}

/// What a job token is remembered as.
#[derive(Debug, Clone)]
pub enum Known {
    /// The identity of its principal.
    Principal(Identity),
    PerToken,
    /// GitLab's 401, replayed.
    Finished(Negative),
}

/// Memory for the token-to-P map (bounded in bytes, whatever callers send).
const JOB_MAP_BYTES: u64 = 16 << 20;

fn weigh_known(k: &Known) -> u32 {
    let body = match k {
        Known::Finished(n) => n.body.len() + 128,
        _ => 0,
    };
    u32::try_from(96 + body).unwrap_or(u32::MAX)
}

/// Job token (its identity) -> what it maps to, in memory only, for at most `auth.grant_ttl`
/// from GitLab's answer: a token already mapped keeps P's grants until then, as a per-token
/// grant would.
pub struct JobMap {
    /// What the token maps to, and the instant that stops (moka's own expiry follows the
    /// real clock; this one [`crate::clock::instant`], which a test build can move).
    map: moka::sync::Cache<Identity, (Known, Instant), foldhash::fast::RandomState>,
    ttl: Duration,
}

impl JobMap {
    pub fn new(grant_ttl: Duration) -> JobMap {
        JobMap {
            map: moka::sync::Cache::builder()
                .max_capacity(JOB_MAP_BYTES)
                .weigher(|_, (k, _)| weigh_known(k))
                .time_to_live(grant_ttl.max(Duration::from_millis(1)))
                .build_with_hasher(foldhash::fast::RandomState::default()),
            ttl: grant_ttl,
        }
    }

    pub fn get(&self, token: Identity) -> Option<Known> {
        self.map
            .get(&token)
            .filter(|(_, until)| crate::clock::instant() < *until)
            .map(|(k, _)| k)
    }

    pub fn insert(&self, token: Identity, known: Known) {
        let until = crate::clock::instant() + self.ttl;
        self.map.insert(token, (known, until));
    }

    /// Bytes held (tests).
    #[cfg(test)]
    pub fn weighted_size(&self) -> u64 {
        self.map.run_pending_tasks();
        self.map.weighted_size()
    }
}

#[cfg(test)]
#[path = "principal_tests.rs"]
mod tests;
