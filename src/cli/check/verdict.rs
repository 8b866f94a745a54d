//! What `tfmirror check` makes of what it found: pure decisions, tested as tables. The I/O
//! that finds the facts is in `check.rs`.

use std::fmt::Write as _;

/// How one check came out. Ordered by gravity: the worst decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Status {
    Ok,
    /// Not run (offline, no token): says what it would take to run it.
    Skipped,
    Warning,
    Failed,
}

/// One line of the report: the check, what was found, and (unless ok) what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Line {
    pub status: Status,
    pub what: &'static str,
    pub detail: String,
    pub fix: Option<String>,
}

impl Line {
    pub fn ok(what: &'static str, detail: impl Into<String>) -> Line {
        Line {
            status: Status::Ok,
            what,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn skipped(what: &'static str, detail: impl Into<String>) -> Line {
        Line {
            status: Status::Skipped,
            ..Line::ok(what, detail)
        }
    }

    pub fn warning(what: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Line {
        Line {
            status: Status::Warning,
            fix: Some(fix.into()),
            ..Line::ok(what, detail)
        }
    }

    pub fn failed(what: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Line {
        Line {
            status: Status::Failed,
            fix: Some(fix.into()),
            ..Line::ok(what, detail)
        }
    }

    /// The line as printed, with every occurrence of a secret in `secrets` masked: the
    /// token is never printed, also not when an error chain would quote it.
    pub fn render(&self, secrets: &[&str]) -> String {
        let word = match self.status {
            Status::Ok => "ok",
            Status::Skipped => "skipped",
            Status::Warning => "warning",
            Status::Failed => "FAILED",
        };
        let mut out = format!("{word:<8} {}: {}", self.what, self.detail);
        if let Some(fix) = &self.fix {
            let _ = write!(out, "\n         fix: {fix}");
        }
        for s in secrets.iter().filter(|s| !s.is_empty()) {
            out = out.replace(s, "[token]");
        }
        out
    }
}

/// 0 when every check passed (or was skipped), 1 when one failed, 3 for warnings only. 2 is
/// left to clap's usage errors, as for every command.
pub(super) fn exit_code(lines: &[Line]) -> u8 {
    match lines.iter().map(|l| l.status).max() {
        Some(Status::Failed) => 1,
        Some(Status::Warning) => 3,
        _ => 0,
    }
}

/// Which GitLab endpoint a token is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Probe<'a> {
    /// `--module`: its version listing, the read Terraform makes.
    Module(&'a str),
    /// A CI job token (`glcbt-`): `GET /api/v4/job`, 200 while the job runs.
    Job,
    /// Any other token: `GET /api/v4/user`.
    User,
}

impl Probe<'_> {
    /// The probe for `token`, given `--module`.
    pub fn of<'a>(token: &str, module: Option<&'a str>) -> Probe<'a> {
        match module {
            Some(m) => Probe::Module(m),
            None if token.starts_with("glcbt-") => Probe::Job,
            None => Probe::User,
        }
    }
}

const RENEW: &str = "give tfmirror a valid token: a personal, project or group access token \
                     with the read_api scope, a deploy token with read_package_registry, or \
                     the job token of a running job";

/// What GitLab's answer to a token probe means. `found`: for a module listing, the number of
/// versions listed; for `/user` or `/job`, the user's name when the body had one.
pub(super) fn token(probe: Probe<'_>, status: u16, found: Option<&str>) -> Line {
    const WHAT: &str = "token";
    let asked = match probe {
        Probe::Module(m) => format!("the version list of {m}"),
        Probe::Job => "/api/v4/job".into(),
        Probe::User => "/api/v4/user".into(),
    };
    match (status, probe) {
        (200, Probe::Module(m)) => listed(m, found.unwrap_or("0")),
        (200, _) => Line::ok(
            WHAT,
            match found {
                Some(user) => format!("GitLab accepts it (user {user})"),
                None => "GitLab accepts it".into(),
            },
        ),
        (401, Probe::User) => Line::failed(
            WHAT,
            "GitLab refused it on /api/v4/user (401): unknown, expired or revoked, or a \
             deploy token (which cannot read /api/v4/user)",
            format!("{RENEW}; check a deploy token with --module NAMESPACE/NAME/SYSTEM"),
        ),
        (401, Probe::Job) => Line::failed(
            WHAT,
            "GitLab refused the job token (401): its job has finished, or it is no job token",
            "run `tfmirror check` inside a running job, or check another token",
        ),
        (401, _) => Line::failed(
            WHAT,
            format!("GitLab refused it on {asked} (401): unknown, expired or revoked"),
            RENEW,
        ),
        (403, Probe::Module(m)) => Line::failed(
            WHAT,
            format!("GitLab denies this token {m} (403)"),
            "give the token's user at least the Reporter role on the module's project (for a \
             job token: add the job's project to that project's job token allowlist)",
        ),
        (403, _) => Line::warning(
            WHAT,
            format!("GitLab refused {asked} (403): the token lacks a scope for it"),
            "check it with --module NAMESPACE/NAME/SYSTEM, the read Terraform makes",
        ),
        (429, _) => Line::warning(
            WHAT,
            format!("GitLab rate-limits this token on {asked} (429)"),
            "try again later; many runners behind one token share its rate limit",
        ),
        (s, _) => Line::failed(
            WHAT,
            format!("GitLab answered {s} to {asked}"),
            "check `upstream` (its relative URL root too) and GitLab's own health",
        ),
    }
}

/// A module's version list read with the token: `n` versions.
fn listed(module: &str, n: &str) -> Line {
    match n {
        "0" => Line::warning(
            "token",
            format!("GitLab lists no version of {module} for this token"),
            "check the module's path (NAMESPACE/NAME/SYSTEM), and that the token's user may \
             read its project: GitLab answers an unknown module with an empty list",
        ),
        n => Line::ok("token", format!("reads {module}: {n} versions")),
    }
}

/// What was found at the cache directory's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DirState {
    /// A directory, with its mode bits and whether this process may write in it.
    Dir { mode: u32, writable: bool },
    /// Something else (a file, a socket).
    NotDir,
    /// Missing; its nearest existing ancestor, and whether that is a writable directory.
    Missing {
        ancestor: String,
        is_dir: bool,
        writable: bool,
    },
}

pub(super) fn cache_dir(shown: &str, state: &DirState) -> Line {
    const WHAT: &str = "cache_dir";
    match state {
        DirState::Dir {
            writable: false, ..
        } => Line::failed(
            WHAT,
            format!("{shown} is not writable by this user"),
            "give tfmirror's user the directory (`chown`), or point `cache_dir` elsewhere",
        ),
        DirState::Dir { mode, .. } if mode & 0o077 != 0 => Line::warning(
            WHAT,
            format!(
                "{shown} has mode {:04o}: other users may read cached private modules",
                mode & 0o777
            ),
            format!("chmod 700 {shown} (tfmirror makes it 0700 itself)"),
        ),
        DirState::Dir { .. } => Line::ok(WHAT, format!("{shown}, mode 0700")),
        DirState::NotDir => Line::failed(
            WHAT,
            format!("{shown} exists and is not a directory"),
            "point `cache_dir` at a directory, or at a path that does not exist yet",
        ),
        DirState::Missing {
            ancestor,
            is_dir: false,
            ..
        } => Line::failed(
            WHAT,
            format!("{shown} cannot be made: {ancestor} is not a directory"),
            "point `cache_dir` at a path under a directory",
        ),
        DirState::Missing {
            ancestor,
            writable: false,
            ..
        } => Line::failed(
            WHAT,
            format!("{shown} cannot be made: {ancestor} is not writable by this user"),
            format!("create {shown} for tfmirror's user, or point `cache_dir` elsewhere"),
        ),
        DirState::Missing { .. } => {
            Line::ok(WHAT, format!("{shown} will be made at start (mode 0700)"))
        }
    }
}

/// Room for `cache.disk_size`: what the filesystem has free plus what the cache already holds.
pub(super) fn space(available: u64, cached: u64, disk_size: u64) -> Line {
    const WHAT: &str = "cache space";
    let iec = |n: u64| bytesize::ByteSize(n).display().iec().to_string();
    let room = available.saturating_add(cached);
    if room >= disk_size {
        Line::ok(
            WHAT,
            format!(
                "{} free, {} cached, cache.disk_size {}",
                iec(available),
                iec(cached),
                iec(disk_size)
            ),
        )
    } else {
        Line::warning(
            WHAT,
            format!(
                "{} free and {} cached, less than cache.disk_size {}: the disk fills before \
                 the cache evicts",
                iec(available),
                iec(cached),
                iec(disk_size)
            ),
            format!(
                "lower `cache.disk_size` to at most {}, or give the cache more room",
                iec(room)
            ),
        )
    }
}

/// The fix for a TLS handshake GitLab's certificate failed, by whether `upstream_ca` is set.
pub(super) fn tls_fix(upstream_ca: bool) -> &'static str {
    if upstream_ca {
        "`upstream_ca` does not vouch for the certificate GitLab presents: put in it the CA \
         certificate that signed GitLab's (or GitLab's own certificate)"
    } else {
        "if GitLab's certificate comes from a private CA, set `upstream_ca` to a PEM file with \
         that CA certificate (or GitLab's own certificate)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(status: Status) -> Line {
        Line {
            status,
            ..Line::ok("x", "y")
        }
    }

    #[test]
    fn the_worst_line_decides_the_exit_code() {
        use Status::*;
        for (statuses, code) in [
            (&[][..], 0),
            (&[Ok, Ok][..], 0),
            (&[Ok, Skipped][..], 0),
            (&[Ok, Warning, Skipped][..], 3),
            (&[Warning, Failed, Ok][..], 1),
            (&[Failed][..], 1),
        ] {
            let lines: Vec<Line> = statuses.iter().map(|s| line(*s)).collect();
            assert_eq!(exit_code(&lines), code, "{statuses:?}");
        }
    }

    #[test]
    fn token_answers_table() {
        use Status::*;
        let m = Probe::Module("infra/vpc/aws");
        for (probe, status, found, want, says) in [
            (m, 200, Some("3"), Ok, "3 versions"),
            (m, 200, Some("0"), Warning, "no version"),
            (m, 401, None, Failed, "401"),
            (m, 403, None, Failed, "Reporter"),
            (m, 404, None, Failed, "404"),
            (m, 429, None, Warning, "rate-limits"),
            (m, 502, None, Failed, "502"),
            (Probe::User, 200, Some("alice"), Ok, "user alice"),
            (Probe::User, 401, None, Failed, "--module"),
            (Probe::User, 403, None, Warning, "scope"),
            (Probe::Job, 200, Some("bob"), Ok, "user bob"),
            (Probe::Job, 401, None, Failed, "running job"),
        ] {
            let l = token(probe, status, found);
            assert_eq!(l.status, want, "{probe:?} {status}");
            let text = l.render(&[]);
            assert!(text.contains(says), "{probe:?} {status}: {text}");
            assert_eq!(l.fix.is_some(), want >= Warning, "{text}");
        }
    }

    #[test]
    fn job_tokens_are_checked_on_the_job_endpoint() {
        assert_eq!(Probe::of("glcbt-abc", None), Probe::Job);
        assert_eq!(Probe::of("glpat-abc", None), Probe::User);
        assert_eq!(
            Probe::of("glcbt-abc", Some("a/b/c")),
            Probe::Module("a/b/c")
        );
    }

    #[test]
    fn cache_dir_table() {
        use Status::*;
        let missing = |is_dir, writable| DirState::Missing {
            ancestor: "/srv".into(),
            is_dir,
            writable,
        };
        for (state, want, says) in [
            (
                DirState::Dir {
                    mode: 0o700,
                    writable: true,
                },
                Ok,
                "mode 0700",
            ),
            (
                DirState::Dir {
                    mode: 0o40755,
                    writable: true,
                },
                Warning,
                "chmod 700 /c",
            ),
            (
                DirState::Dir {
                    mode: 0o700,
                    writable: false,
                },
                Failed,
                "not writable",
            ),
            (DirState::NotDir, Failed, "not a directory"),
            (missing(true, true), Ok, "will be made"),
            (missing(false, true), Failed, "/srv is not a directory"),
            (missing(true, false), Failed, "/srv is not writable"),
        ] {
            let l = cache_dir("/c", &state);
            assert_eq!(l.status, want, "{state:?}");
            assert!(l.render(&[]).contains(says), "{state:?}: {}", l.render(&[]));
        }
    }

    #[test]
    fn space_counts_what_the_cache_already_holds() {
        const G: u64 = 1 << 30;
        assert_eq!(space(20 * G, 0, 10 * G).status, Status::Ok);
        assert_eq!(space(2 * G, 8 * G, 10 * G).status, Status::Ok);
        let l = space(G, G, 10 * G);
        assert_eq!(l.status, Status::Warning);
        assert!(
            l.render(&[]).contains("at most 2.0 GiB"),
            "{}",
            l.render(&[])
        );
    }

    #[test]
    fn secrets_are_masked_wherever_they_appear() {
        let l = Line::failed("token", "refused glpat-S3cret here", "not glpat-S3cret");
        let text = l.render(&["glpat-S3cret", ""]);
        assert!(!text.contains("S3cret"), "{text}");
        assert_eq!(text.matches("[token]").count(), 2, "{text}");
    }
}
