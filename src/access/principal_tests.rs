use super::*;

fn b64url(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

fn jwt(payload: &str) -> String {
    format!(
        "glcbt-{}.{}.c2ln",
        b64url(r#"{"alg":"RS256","typ":"JWT"}"#),
        b64url(payload)
    )
}

fn basic(user: &str, password: &str) -> HeaderValue {
    let raw = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    HeaderValue::from_str(&format!("Basic {raw}")).unwrap()
}

#[test]
fn job_tokens_are_bearer_or_basic_gitlab_ci_token() {
    let table: Vec<(HeaderValue, Option<&str>)> = vec![
        (
            HeaderValue::from_static("Bearer glcbt-abc"),
            Some("glcbt-abc"),
        ),
        (
            HeaderValue::from_static("bearer glcbt-abc"),
            Some("glcbt-abc"),
        ),
        (basic("gitlab-ci-token", "glcbt-abc"), Some("glcbt-abc")),
        // A PAT, a deploy token, a legacy (pre-16.9) job token: per token.
        (HeaderValue::from_static("Bearer glpat-abc"), None),
        (basic("gitlab-ci-token", "64charslegacy"), None),
        (basic("deploy-user", "gldt-abc"), None),
        // Another Basic user with a job token: not how GitLab takes it.
        (basic("alice", "glcbt-abc"), None),
        (HeaderValue::from_static("Negotiate glcbt-abc"), None),
        (HeaderValue::from_static("glcbt-abc"), None),
    ];
    for (header, want) in table {
        assert_eq!(job_token(&header).as_deref(), want, "{header:?}");
    }
    let huge = format!("Bearer glcbt-{}", "x".repeat(MAX_TOKEN));
    assert_eq!(job_token(&HeaderValue::from_str(&huge).unwrap()), None);
}

#[test]
fn forms_are_read_from_the_payload() {
    let sub =
        r#""sub":"gid://gitlab/Ci::Build/7","aud":"gitlab-authz-token","exp":1,"iat":0,"jti":"x""#;
    let table = [
        ("glcbt-64f_3fa2b1c9e8d7".to_string(), Form::Legacy),
        ("glcbt-a.b.c".to_string(), Form::Legacy),
        (
            jwt(&format!("{{{sub}}}")),
            Form::Jwt {
                scoped_user_id: None,
            },
        ),
        (
            jwt(&format!(r#"{{{sub},"cell_id":1,"organization_id":1}}"#)),
            Form::Jwt {
                scoped_user_id: None,
            },
        ),
        (
            jwt(&format!(r#"{{{sub},"scoped_user_id":42}}"#)),
            Form::Jwt {
                scoped_user_id: Some(42),
            },
        ),
        (
            jwt(&format!(r#"{{{sub},"scoped_user_id":"42"}}"#)),
            Form::Jwt {
                scoped_user_id: Some(42),
            },
        ),
        (
            jwt(&format!(r#"{{{sub},"scoped_user_id":null}}"#)),
            Form::Jwt {
                scoped_user_id: None,
            },
        ),
        // Claims tfmirror does not know (finer permissions to come): fail closed.
        (
            jwt(&format!(r#"{{{sub},"permissions":["read_package"]}}"#)),
            Form::UnknownClaims,
        ),
        (
            jwt(&format!(r#"{{{sub},"scoped_user_id":"x"}}"#)),
            Form::UnknownClaims,
        ),
        (jwt("[1,2]"), Form::UnknownClaims),
    ];
    for (token, want) in table {
        assert_eq!(form(&token), want, "{token}");
    }
}

#[test]
fn the_job_answer_is_read_as_gitlab_sends_it() {
    let body = br#"{"id":9,"status":"running","user":{"id":5,"username":"a","bot":false},
        "pipeline":{"id":3,"project_id":12,"ref":"main"}}"#;
    assert_eq!(
        parse_job(body),
        Some(Job {
            project_id: 12,
            user_id: 5,
            bot: false
        })
    );
    let bot = br#"{"user":{"id":5,"bot":true},"pipeline":{"project_id":12}}"#;
    assert!(parse_job(bot).unwrap().bot);
    assert_eq!(parse_job(br#"{"user":{"id":5}}"#), None);
    assert_eq!(parse_job(b"not json"), None);
}

#[test]
fn mappings_from_gitlabs_answer() {
    let job = Job {
        project_id: 12,
        user_id: 5,
        bot: false,
    };
    let bot = Job { bot: true, ..job };
    let p = |scoped| {
        Mapping::Principal(Principal {
            job_project_id: 12,
            user_id: 5,
            scoped_user_id: scoped,
        })
    };
    let jwt = Form::Jwt {
        scoped_user_id: None,
    };
    let composite = Form::Jwt {
        scoped_user_id: Some(77),
    };
    let table = [
        (Form::Legacy, JobAnswer::Running(Some(job)), p(None)),
        (jwt, JobAnswer::Running(Some(job)), p(None)),
        (composite, JobAnswer::Running(Some(job)), p(Some(77))),
        // A composite identity is explicit in the JWT form; a legacy bot token's is not.
        (composite, JobAnswer::Running(Some(bot)), p(Some(77))),
        (
            Form::Legacy,
            JobAnswer::Running(Some(bot)),
            Mapping::PerToken,
        ),
        (
            Form::UnknownClaims,
            JobAnswer::Running(Some(job)),
            Mapping::PerToken,
        ),
        (Form::Legacy, JobAnswer::Running(None), Mapping::PerToken),
        // The job is over: a 401, whatever the form.
        (Form::Legacy, JobAnswer::Unauthorized, Mapping::Finished),
        (jwt, JobAnswer::Unauthorized, Mapping::Finished),
        (
            Form::UnknownClaims,
            JobAnswer::Unauthorized,
            Mapping::Finished,
        ),
        // GitLab did not say (down, 5xx, 403, 429): per token now, asked again later.
        (Form::Legacy, JobAnswer::Other, Mapping::Unknown),
        (jwt, JobAnswer::Other, Mapping::Unknown),
        (jwt, JobAnswer::Failed, Mapping::Unknown),
    ];
    for (form, answer, want) in table {
        assert_eq!(mapping(form, answer), want, "{form:?} {answer:?}");
    }
    assert!(!ask_gitlab(Form::UnknownClaims));
    assert!(ask_gitlab(Form::Legacy) && ask_gitlab(jwt));
}

#[test]
fn principals_have_identities_of_their_own() {
    let s = Secret::from_master(&[1; 32]);
    let p = Principal {
        job_project_id: 12,
        user_id: 5,
        scoped_user_id: None,
    };
    let other_user = Principal { user_id: 6, ..p };
    let scoped = Principal {
        scoped_user_id: Some(5),
        ..p
    };
    let ids = [p.identity(&s), other_user.identity(&s), scoped.identity(&s)];
    assert_ne!(ids[0], ids[1]);
    assert_ne!(ids[0], ids[2]);
    assert_eq!(p.identity(&s), ids[0]);
    assert_ne!(p.identity(&Secret::from_master(&[2; 32])), ids[0]);
    assert!(!ids[0].is_anonymous());
}

#[test]
fn the_job_map_is_bounded_in_bytes() {
    let map = JobMap::new(Duration::from_secs(60));
    let body = bytes::Bytes::from(vec![b'x'; 2000]);
    for i in 0..20_000u32 {
        let mut raw = [1u8; 16];
        raw[..4].copy_from_slice(&i.to_le_bytes());
        let known = Known::Finished(Negative {
            status: http::StatusCode::UNAUTHORIZED,
            www_authenticate: None,
            body: body.clone(),
        });
        map.insert(Identity(raw), known);
    }
    assert!(map.weighted_size() <= JOB_MAP_BYTES);
}

const JOB: Job = Job {
    project_id: 12,
    user_id: 5,
    bot: false,
};
const SAME: IdToken = IdToken::Verified {
    job_project_id: 12,
    user_id: 5,
};
const P: Principal = Principal {
    job_project_id: 12,
    user_id: 5,
    scoped_user_id: None,
};

fn check(table: &[(Form, JobAnswer, IdToken, Resolved)]) {
    for (form, answer, id, want) in table {
        assert_eq!(
            resolve(*form, *answer, *id),
            *want,
            "{form:?} {answer:?} {id:?}"
        );
    }
}

#[test]
fn online_the_id_token_must_agree_with_gitlab() {
    let other_user = IdToken::Verified {
        job_project_id: 12,
        user_id: 6,
    };
    let other_project = IdToken::Verified {
        job_project_id: 13,
        user_id: 5,
    };
    let running = JobAnswer::Running(Some(JOB));
    let mapped = Resolved::Mapped(Mapping::Principal(P));
    check(&[
        (Form::Legacy, running, SAME, mapped),
        (Form::Legacy, running, IdToken::Absent, mapped),
        (Form::Legacy, running, IdToken::Rejected, mapped),
        (Form::Legacy, running, other_user, Resolved::Mismatch),
        (Form::Legacy, running, other_project, Resolved::Mismatch),
        // A finished job stays finished, whatever its ID token says.
        (
            Form::Legacy,
            JobAnswer::Unauthorized,
            SAME,
            Resolved::Mapped(Mapping::Finished),
        ),
    ]);
}

#[test]
fn an_id_token_stands_in_only_when_gitlab_cannot_be_asked() {
    let composite = Form::Jwt {
        scoped_user_id: Some(77),
    };
    let unknown = Resolved::Mapped(Mapping::Unknown);
    check(&[
        // A verified ID token stands in, with no scoped user.
        (Form::Legacy, JobAnswer::Failed, SAME, Resolved::Offline(P)),
        (composite, JobAnswer::Failed, SAME, Resolved::Offline(P)),
        (Form::Legacy, JobAnswer::Failed, IdToken::Rejected, unknown),
        (Form::Legacy, JobAnswer::Failed, IdToken::Absent, unknown),
        // GitLab answered something else (403, 429): not down; the ID token gives nothing.
        (Form::Legacy, JobAnswer::Other, SAME, unknown),
        (
            Form::UnknownClaims,
            JobAnswer::Failed,
            SAME,
            Resolved::Mapped(Mapping::PerToken),
        ),
    ]);
}

#[test]
fn basic_job_users_are_known_by_their_name_whatever_the_token() {
    let table = [
        (basic("gitlab-ci-token", "glcbt-abc"), true),
        (basic("gitlab-ci-token", "64charslegacy"), true),
        (basic("gitlab-ci-tokenx", "abc"), false),
        (basic("deploy-user", "gldt-abc"), false),
        (HeaderValue::from_static("Bearer glcbt-abc"), false),
        (HeaderValue::from_static("Basic !!!"), false),
        (HeaderValue::from_static("Basic"), false),
    ];
    for (cred, want) in table {
        assert_eq!(is_basic_job_user(&cred), want, "{cred:?}");
    }
}
