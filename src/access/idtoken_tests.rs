use super::*;
use ring::signature::{KeyPair, RsaKeyPair, RSA_PKCS1_SHA256};

const GITLAB_KEY: &[u8] = include_bytes!("../../tests/data/keys/gitlab.pk8");
const FORGER_KEY: &[u8] = include_bytes!("../../tests/data/keys/forger.pk8");
const NOW: u64 = 1_800_000_000;
const ISSUER: &str = "https://gitlab.example.com";
const AUDIENCE: &str = "https://tfmirror.example.com";

fn jwk(key: &[u8], kid: &str) -> serde_json::Value {
    let pair = RsaKeyPair::from_pkcs8(key).unwrap();
    let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    serde_json::json!({
        "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
        "n": B64URL.encode(&c.n), "e": B64URL.encode(&c.e),
    })
}

fn keys() -> KeySet {
    let doc = serde_json::json!({ "keys": [jwk(GITLAB_KEY, "k1")] });
    parse_jwks(doc.to_string().as_bytes()).unwrap()
}

fn sign(key: &[u8], header: &serde_json::Value, claims: &serde_json::Value) -> String {
    let pair = RsaKeyPair::from_pkcs8(key).unwrap();
    let input = format!(
        "{}.{}",
        B64URL.encode(header.to_string()),
        B64URL.encode(claims.to_string())
    );
    let mut sig = vec![0; pair.public().modulus_len()];
    let rng = ring::rand::SystemRandom::new();
    pair.sign(&RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut sig)
        .unwrap();
    format!("{input}.{}", B64URL.encode(sig))
}

/// GitLab's claims, as strings where GitLab sends strings.
fn claims() -> serde_json::Value {
    serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "iat": NOW - 10, "nbf": NOW - 15, "exp": NOW + 3600,
        "sub": "project_path:g/p:ref_type:branch:ref:main", "job_id": "77",
        "project_id": "12", "job_project_id": "12", "user_id": "5",
        "ref_protected": "true", "namespace_id": "3",
    })
}

fn header() -> serde_json::Value {
    serde_json::json!({ "alg": "RS256", "kid": "k1", "typ": "JWT" })
}

fn expect() -> Expect<'static> {
    Expect {
        audience: AUDIENCE,
        issuer: ISSUER,
        require_ref_protected: false,
        now: NOW,
    }
}

fn with(f: impl FnOnce(&mut serde_json::Value)) -> serde_json::Value {
    let mut c = claims();
    f(&mut c);
    c
}

const OK: IdClaims = IdClaims {
    job_project_id: 12,
    user_id: 5,
    exp: NOW + 3600,
};

fn check(table: Vec<(String, Result<IdClaims, Rejected>)>) {
    for (token, want) in table {
        assert_eq!(verify(&token, &keys(), &expect()), want, "{token}");
    }
}

fn good(f: impl FnOnce(&mut serde_json::Value)) -> String {
    sign(GITLAB_KEY, &header(), &with(f))
}

#[test]
fn only_gitlabs_rs256_signature_counts() {
    let unsigned = |alg: &str| {
        format!(
            "{}.{}.c2ln",
            B64URL.encode(format!(r#"{{"alg":"{alg}","kid":"k1"}}"#)),
            B64URL.encode(claims().to_string())
        )
    };
    let valid = good(|_| {});
    // A valid token with its payload swapped keeps the signature of another payload.
    let tampered = {
        let parts: Vec<&str> = valid.split('.').collect();
        let other = with(|c| c["user_id"] = "6".into());
        let payload = B64URL.encode(other.to_string());
        format!("{}.{payload}.{}", parts[0], parts[2])
    };
    let other_kid = serde_json::json!({"alg": "RS256", "kid": "k9"});
    check(vec![
        (valid, Ok(OK)),
        (
            sign(FORGER_KEY, &header(), &claims()),
            Err(Rejected::Signature),
        ),
        (
            sign(GITLAB_KEY, &other_kid, &claims()),
            Err(Rejected::UnknownKid),
        ),
        (unsigned("none"), Err(Rejected::Alg)),
        (unsigned("HS256"), Err(Rejected::Alg)),
        (tampered, Err(Rejected::Signature)),
        ("a.b".to_string(), Err(Rejected::Malformed)),
    ]);
}

#[test]
fn the_claims_are_checked_as_gitlab_writes_them() {
    let aud_list = serde_json::json!(["vault", AUDIENCE]);
    check(vec![
        // A fork's merge request: `project_id` is the fork, `job_project_id` decides.
        (good(|c| c["project_id"] = "999".into()), Ok(OK)),
        (
            good(|c| {
                c.as_object_mut().unwrap().remove("job_project_id");
            }),
            Err(Rejected::NoIdentity),
        ),
        (good(|c| c["aud"] = "vault".into()), Err(Rejected::Audience)),
        (good(|c| c["aud"] = aud_list), Ok(OK)),
        (
            good(|c| c["iss"] = "https://gitlab.example.com/".into()),
            Err(Rejected::Issuer),
        ),
        (
            good(|c| c["exp"] = (NOW - 61).into()),
            Err(Rejected::Expired),
        ),
        (
            good(|c| c["exp"] = (NOW - 59).into()),
            Ok(IdClaims {
                exp: NOW - 59,
                ..OK
            }),
        ),
        (
            good(|c| c["nbf"] = (NOW + 61).into()),
            Err(Rejected::NotYetValid),
        ),
    ]);
}

#[test]
fn ref_protected_when_required_must_be_the_string_true() {
    let strict = Expect {
        require_ref_protected: true,
        ..expect()
    };
    assert_eq!(verify(&good(|_| {}), &keys(), &strict), Ok(OK));
    for v in [serde_json::json!("false"), serde_json::json!(true)] {
        let t = good(|c| c["ref_protected"] = v);
        assert_eq!(verify(&t, &keys(), &strict), Err(Rejected::RefNotProtected));
    }
}

#[test]
fn only_sound_keys_of_a_jwks_are_kept() {
    let good = jwk(GITLAB_KEY, "k1");
    let mut es = good.clone();
    es["alg"] = "ES256".into();
    es["kid"] = "k2".into();
    let mut ec = good.clone();
    ec["kty"] = "EC".into();
    ec["kid"] = "k3".into();
    let mut small = good.clone();
    small["kid"] = "k4".into();
    small["n"] = B64URL.encode([0xffu8; 128]).into();
    let mut no_alg = jwk(FORGER_KEY, "k5");
    no_alg.as_object_mut().unwrap().remove("alg");
    let twice_a = jwk(GITLAB_KEY, "k6");
    let twice_b = jwk(FORGER_KEY, "k6");
    let doc = serde_json::json!({ "keys": [good, es, ec, small, no_alg, twice_a, twice_b] });
    let set = parse_jwks(doc.to_string().as_bytes()).unwrap();
    let kept: Vec<&str> = ["k1", "k2", "k3", "k4", "k5", "k6"]
        .into_iter()
        .filter(|k| set.knows(k))
        .collect();
    assert_eq!(kept, ["k1", "k5"]);
    assert_eq!(parse_jwks(b"<html>"), None);
    assert_eq!(parse_jwks(br#"{"no":"keys"}"#), None);
}

#[test]
fn the_id_token_is_split_off_job_tokens_only() {
    let id = sign(GITLAB_KEY, &header(), &claims());
    let bearer = HeaderValue::from_str(&format!("Bearer glcbt-abc~{id}")).unwrap();
    let (cred, got) = split(&bearer).unwrap();
    assert_eq!(cred, "Bearer glcbt-abc");
    assert_eq!(got, id);
    let std = base64::engine::general_purpose::STANDARD;
    let basic = format!(
        "Basic {}",
        std.encode(format!("gitlab-ci-token:glcbt-abc~{id}"))
    );
    let (cred, got) = split(&HeaderValue::from_str(&basic).unwrap()).unwrap();
    let plain = format!("Basic {}", std.encode("gitlab-ci-token:glcbt-abc"));
    assert_eq!(cred, plain.as_str());
    assert_eq!(got, id);
    // Left alone: not a job token, not a JWT after the `~`, no `~`.
    for v in [
        format!("Bearer glpat-abc~{id}"),
        "Bearer glcbt-abc~not-a-jwt".to_string(),
        "Bearer glcbt-abc~a.b".to_string(),
        "Bearer glcbt-abc~a.b.c~d".to_string(),
        "Bearer glcbt-abc".to_string(),
        format!("Negotiate glcbt-abc~{id}"),
    ] {
        assert_eq!(split(&HeaderValue::from_str(&v).unwrap()), None, "{v}");
    }
}
