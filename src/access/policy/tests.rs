//! The policy as a table: each row is a situation a user can be in, and what they get.

use super::*;
use Action::*;
use StaleSource::*;
use Why::*;

const NOW: u64 = 1_000_000;
const W: Windows = Windows {
    grant_ttl: 60,
    listing_ttl: 30,
    revalidate: 60,
    stale_if_error: 7 * 24 * 3600,
};
const TOO_OLD: u64 = NOW - (30 + 7 * 24 * 3600) - 1;

/// A caller with an expired grant asking for a listing it received 100 s ago; GitLab up.
fn base() -> Facts {
    Facts {
        now: NOW,
        kind: Kind::Listing,
        standing: Standing::Expired,
        own: Some(NOW - 100),
        public: None,
        shared: None,
        has_credential: true,
        invalidated: false,
        can_refresh: true,
        recently_refused: false,
        held_back: false,
        breaker: Breaker::Up,
        gitlab: Gitlab::NotAsked,
        unknown_identity: UnknownIdentity::Deny,
        imported: None,
        imported_readers: ImportedReaders::None,
        listed_reader: false,
    }
}

/// A caller GitLab never saw, on a sealed mirror, asking for what a bundle brought.
fn sealed(f: &mut Facts) {
    f.standing = Standing::Unknown;
    f.own = None;
    f.breaker = Breaker::Offline;
    f.imported = Some(Bundled::Private);
}

type Row = (&'static str, fn(&mut Facts), Action);

#[rustfmt::skip]
const ROWS: &[Row] = &[
    // Fresh grants: the cache answers, GitLab is not asked.
    ("fresh listing within listing_ttl", |f| { f.standing = Standing::Fresh; f.own = Some(NOW - 10) }, Fresh),
    // The window edges follow `crate::windows` (half-open), as provider lists do.
    ("fresh listing exactly listing_ttl old", |f| { f.standing = Standing::Fresh; f.own = Some(NOW - 30) }, Revalidate),
    ("fresh listing exactly at the revalidate edge", |f| { f.standing = Standing::Fresh; f.own = Some(NOW - 90) }, Ask),
    ("own answer exactly at the stale_if_error edge, GitLab failed", |f| { f.own = Some(TOO_OLD + 1); f.gitlab = Gitlab::Failed }, Refuse(NothingCached)),
    ("own answer just inside stale_if_error, GitLab failed", |f| { f.own = Some(TOO_OLD + 2); f.gitlab = Gitlab::Failed }, Stale(Own)),
    ("fresh listing past ttl, refreshable", |f| { f.standing = Standing::Fresh; f.own = Some(NOW - 40) }, Revalidate),
    ("fresh listing past ttl, no credential to refresh with", |f| { f.standing = Standing::Fresh; f.own = Some(NOW - 40); f.can_refresh = false }, Ask),
    ("fresh listing past ttl, breaker open", |f| { f.standing = Standing::Fresh; f.own = Some(NOW - 40); f.breaker = Breaker::Open }, Stale(Own)),
    ("fresh listing past the revalidate window", |f| { f.standing = Standing::Fresh; f.own = Some(NOW - 200) }, Ask),
    ("fresh grant, download of a listed version", |f| { f.kind = Kind::Download; f.standing = Standing::Fresh; f.own = Some(NOW - 5) }, Fresh),
    ("fresh grant, download of a version not in its listing", |f| { f.kind = Kind::Download; f.standing = Standing::Fresh; f.own = None }, Ask),
    ("fresh grant, listing changed by an upload", |f| { f.standing = Standing::Fresh; f.own = Some(NOW - 10); f.invalidated = true }, Ask),
    ("fresh grant is served even while rate-limited", |f| { f.kind = Kind::Download; f.standing = Standing::Fresh; f.own = Some(NOW); f.held_back = true }, Fresh),
    ("fresh grant is served in offline mode", |f| { f.standing = Standing::Fresh; f.own = Some(NOW - 10); f.breaker = Breaker::Offline }, Fresh),
    // Expired grants: GitLab decides; slow is not failed (the handler waits up to the deadline).
    ("expired grant, GitLab up: ask", |_| {}, Ask),
    ("expired grant, GitLab answered", |f| f.gitlab = Gitlab::Answered, Relay),
    ("expired grant, GitLab refused (removed member)", |f| f.gitlab = Gitlab::Refused, Relay),
    ("expired grant, GitLab rate-limited this caller", |f| f.gitlab = Gitlab::RateLimited, Relay),
    ("expired grant, GitLab failed", |f| f.gitlab = Gitlab::Failed, Stale(Own)),
    ("expired grant, breaker open", |f| f.breaker = Breaker::Open, Stale(Own)),
    ("expired grant, offline mode", |f| f.breaker = Breaker::Offline, Stale(Own)),
    ("expired grant, own answer too old, GitLab failed", |f| { f.own = Some(TOO_OLD); f.gitlab = Gitlab::Failed }, Refuse(NothingCached)),
    ("expired grant without this version, GitLab failed", |f| { f.kind = Kind::Download; f.own = None; f.gitlab = Gitlab::Failed }, Refuse(NothingCached)),
    ("fresh grant, invalidated listing, GitLab failed", |f| { f.standing = Standing::Fresh; f.invalidated = true; f.gitlab = Gitlab::Failed }, Stale(Own)),
    // Caller-provoked conditions never open the cache.
    ("expired grant, own Retry-After running", |f| f.held_back = true, HoldBack),
    ("unknown identity, own Retry-After running, breaker open", |f| { f.standing = Standing::Unknown; f.own = None; f.held_back = true; f.breaker = Breaker::Open }, HoldBack),
    ("refusal replayed for a few seconds", |f| { f.standing = Standing::Unknown; f.own = None; f.recently_refused = true }, Replay),
    ("refusal replayed before a stale answer", |f| { f.recently_refused = true; f.breaker = Breaker::Open }, Replay),
    // Refused identities get nothing from the cache, whatever GitLab does.
    ("refused identity, GitLab failed", |f| { f.standing = Standing::Refused; f.gitlab = Gitlab::Failed }, Refuse(RefusedBefore)),
    ("refused identity, public module, GitLab failed", |f| { f.standing = Standing::Refused; f.public = Some(NOW); f.gitlab = Gitlab::Failed }, Refuse(RefusedBefore)),
    ("refused identity, policy anyone, GitLab failed", |f| { f.standing = Standing::Refused; f.shared = Some(NOW); f.unknown_identity = UnknownIdentity::Anyone; f.gitlab = Gitlab::Failed }, Refuse(RefusedBefore)),
    ("refused identity, breaker open: it probes", |f| { f.standing = Standing::Refused; f.breaker = Breaker::Open }, Ask),
    ("refused identity, offline mode", |f| { f.standing = Standing::Refused; f.breaker = Breaker::Offline }, Refuse(RefusedBefore)),
    // Identities never seen: public modules, then offline.unknown_identity.
    ("unknown identity, GitLab up: ask", |f| { f.standing = Standing::Unknown; f.own = None }, Ask),
    ("unknown identity, public module, GitLab failed", |f| { f.standing = Standing::Unknown; f.own = None; f.public = Some(NOW - 50); f.gitlab = Gitlab::Failed }, Stale(Public)),
    ("unknown identity, public record too old", |f| { f.standing = Standing::Unknown; f.own = None; f.public = Some(TOO_OLD); f.gitlab = Gitlab::Failed }, Refuse(UnknownDenied)),
    ("unknown identity, policy deny", |f| { f.standing = Standing::Unknown; f.own = None; f.shared = Some(NOW); f.gitlab = Gitlab::Failed }, Refuse(UnknownDenied)),
    ("unknown identity, policy authenticated, with credential, GitLab down", |f| { f.standing = Standing::Unknown; f.own = None; f.shared = Some(NOW); f.unknown_identity = UnknownIdentity::Authenticated; f.gitlab = Gitlab::Failed; f.breaker = Breaker::Open }, Stale(SharedAuthenticated)),
    ("unknown identity, policy authenticated, anonymous", |f| { f.standing = Standing::Unknown; f.own = None; f.has_credential = false; f.shared = Some(NOW); f.unknown_identity = UnknownIdentity::Authenticated; f.gitlab = Gitlab::Failed; f.breaker = Breaker::Open }, Refuse(UnknownDenied)),
    ("unknown identity, policy anyone, anonymous, GitLab down", |f| { f.standing = Standing::Unknown; f.own = None; f.has_credential = false; f.shared = Some(NOW); f.unknown_identity = UnknownIdentity::Anyone; f.gitlab = Gitlab::Failed; f.breaker = Breaker::Open }, Stale(SharedAnyone)),
    ("unknown identity, policy anyone, nothing cached", |f| { f.standing = Standing::Unknown; f.own = None; f.unknown_identity = UnknownIdentity::Anyone; f.gitlab = Gitlab::Failed; f.breaker = Breaker::Open }, Refuse(NothingCached)),
    // Only while GitLab is down for everyone: a caller whose own request failed (its own
    // 5xx, its deadline) while the breaker says GitLab is up reads nothing others fetched.
    ("unknown identity, policy authenticated, own request failed, GitLab up", |f| { f.standing = Standing::Unknown; f.own = None; f.shared = Some(NOW); f.unknown_identity = UnknownIdentity::Authenticated; f.gitlab = Gitlab::Failed }, Refuse(UnknownDenied)),
    ("unknown identity, policy anyone, own request failed, GitLab up", |f| { f.standing = Standing::Unknown; f.own = None; f.has_credential = false; f.shared = Some(NOW); f.unknown_identity = UnknownIdentity::Anyone; f.gitlab = Gitlab::Failed }, Refuse(UnknownDenied)),
    ("granted before, policy anyone, other's answer, own request failed, GitLab up", |f| { f.own = None; f.shared = Some(NOW); f.unknown_identity = UnknownIdentity::Anyone; f.gitlab = Gitlab::Failed }, Refuse(NothingCached)),
    ("unknown identity, public module, own request failed, GitLab up", |f| { f.standing = Standing::Unknown; f.own = None; f.public = Some(NOW); f.gitlab = Gitlab::Failed }, Stale(Public)),
    ("unknown identity, breaker open, public module", |f| { f.standing = Standing::Unknown; f.own = None; f.public = Some(NOW); f.breaker = Breaker::Open }, Stale(Public)),
    ("unknown identity, breaker open, deny: it probes", |f| { f.standing = Standing::Unknown; f.own = None; f.breaker = Breaker::Open }, Ask),
    ("unknown identity, offline mode, deny", |f| { f.standing = Standing::Unknown; f.own = None; f.breaker = Breaker::Offline }, Refuse(UnknownDenied)),
    ("unknown identity, offline mode, authenticated", |f| { f.standing = Standing::Unknown; f.own = None; f.shared = Some(NOW); f.unknown_identity = UnknownIdentity::Authenticated; f.breaker = Breaker::Offline }, Stale(SharedAuthenticated)),
    // Sealed mirrors: what a bundle brought, as offline.imported_readers says; age plays no part.
    ("imported private module, readers none", |f| sealed(f), Refuse(NotReader)),
    ("imported private module, readers none, unknown_identity anyone", |f| { sealed(f); f.shared = Some(NOW); f.unknown_identity = UnknownIdentity::Anyone }, Stale(SharedAnyone)),
    ("imported private module only, readers none, unknown_identity anyone", |f| { sealed(f); f.unknown_identity = UnknownIdentity::Anyone }, Refuse(NotReader)),
    ("imported private module, readers anyone, anonymous", |f| { sealed(f); f.has_credential = false; f.imported_readers = ImportedReaders::Anyone }, Stale(Imported)),
    ("imported private module, readers listed, listed caller", |f| { sealed(f); f.imported_readers = ImportedReaders::Listed; f.listed_reader = true }, Stale(Imported)),
    ("imported private module, readers listed, other caller", |f| { sealed(f); f.imported_readers = ImportedReaders::Listed }, Refuse(NotReader)),
    ("imported public module, readers none, anonymous", |f| { sealed(f); f.has_credential = false; f.imported = Some(Bundled::Public) }, Stale(Imported)),
    ("imported answers do not age on a sealed mirror", |f| { sealed(f); f.imported_readers = ImportedReaders::Anyone; f.own = Some(TOO_OLD) }, Stale(Imported)),
    ("imported answers are not read while GitLab can be asked", |f| { sealed(f); f.imported_readers = ImportedReaders::Anyone; f.breaker = Breaker::Open; f.gitlab = Gitlab::Failed }, Refuse(UnknownDenied)),
    ("refused identity, imported module, readers anyone", |f| { sealed(f); f.standing = Standing::Refused; f.imported_readers = ImportedReaders::Anyone }, Refuse(RefusedBefore)),
    ("unknown identity, rate-limited by GitLab", |f| { f.standing = Standing::Unknown; f.own = None; f.public = Some(NOW); f.gitlab = Gitlab::RateLimited }, Relay),
];

#[test]
fn every_row_of_the_policy() {
    let mut failures = Vec::new();
    for (name, setup, want) in ROWS {
        let mut f = base();
        setup(&mut f);
        let got = decide(&f, &W);
        if got != *want {
            failures.push(format!("{name}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_table_covers_every_action_and_every_gitlab_outcome() {
    let actions: std::collections::HashSet<String> =
        ROWS.iter().map(|(_, _, a)| format!("{a:?}")).collect();
    for a in [
        Fresh,
        Revalidate,
        Replay,
        HoldBack,
        Ask,
        Relay,
        Stale(Own),
        Stale(Public),
        Stale(SharedAnyone),
        Stale(SharedAuthenticated),
        Stale(Imported),
        Refuse(RefusedBefore),
        Refuse(UnknownDenied),
        Refuse(NothingCached),
        Refuse(NotReader),
    ] {
        assert!(actions.contains(&format!("{a:?}")), "no row ends in {a:?}");
    }
    let outcomes: std::collections::HashSet<String> = ROWS
        .iter()
        .map(|(_, setup, _)| {
            let mut f = base();
            setup(&mut f);
            format!("{:?}", f.gitlab)
        })
        .collect();
    assert_eq!(outcomes.len(), 5, "{outcomes:?}");
}

#[test]
fn standing_from_a_grant() {
    let at = |age: u64| Some(NOW - age);
    assert_eq!(standing(None, false, NOW, &W), Standing::Unknown);
    assert_eq!(standing(at(0), false, NOW, &W), Standing::Fresh);
    assert_eq!(standing(at(59), false, NOW, &W), Standing::Fresh);
    assert_eq!(standing(at(60), false, NOW, &W), Standing::Expired);
    assert_eq!(
        standing(at(60 + 7 * 24 * 3600), false, NOW, &W),
        Standing::Expired
    );
    assert_eq!(
        standing(at(61 + 7 * 24 * 3600), false, NOW, &W),
        Standing::Unknown
    );
    assert_eq!(standing(at(0), true, NOW, &W), Standing::Refused);
    assert_eq!(standing(None, true, NOW, &W), Standing::Refused);
    // A zero grant_ttl still trusts an answer within its own second.
    let w = Windows { grant_ttl: 0, ..W };
    assert_eq!(standing(at(0), false, NOW, &w), Standing::Fresh);
}

#[test]
fn a_refused_identity_never_gets_a_stale_answer() {
    // Exhaustive over every other fact: no combination serves a refused identity.
    for gitlab in [Gitlab::NotAsked, Gitlab::Failed] {
        for breaker in [Breaker::Up, Breaker::Open, Breaker::Offline] {
            for unknown in [
                UnknownIdentity::Deny,
                UnknownIdentity::Authenticated,
                UnknownIdentity::Anyone,
            ] {
                for has_credential in [false, true] {
                    let f = Facts {
                        standing: Standing::Refused,
                        public: Some(NOW),
                        shared: Some(NOW),
                        gitlab,
                        breaker,
                        unknown_identity: unknown,
                        has_credential,
                        ..base()
                    };
                    let a = decide(&f, &W);
                    assert!(
                        !matches!(a, Stale(_) | Fresh | Revalidate),
                        "{f:?} -> {a:?}"
                    );
                    // Whatever GitLab's state, it gets GitLab's refusal (or GitLab is asked
                    // again), never "unavailable": a tier in front must not read an outage.
                    assert!(matches!(a, Ask | Refuse(RefusedBefore)), "{f:?} -> {a:?}");
                }
            }
        }
    }
}

#[test]
fn only_a_failure_opens_the_stale_path() {
    // With everything cached and the widest policy, GitLab's own answers are always relayed.
    for gitlab in [Gitlab::Answered, Gitlab::Refused, Gitlab::RateLimited] {
        let f = Facts {
            public: Some(NOW),
            shared: Some(NOW),
            unknown_identity: UnknownIdentity::Anyone,
            gitlab,
            ..base()
        };
        assert_eq!(decide(&f, &W), Relay, "{gitlab:?}");
    }
}

#[test]
fn what_others_fetched_is_served_only_while_gitlab_is_down() {
    // Exhaustive: with the breaker up, no stale answer comes from another caller's fetch.
    for unknown in [UnknownIdentity::Authenticated, UnknownIdentity::Anyone] {
        for standing in [Standing::Unknown, Standing::Expired, Standing::Fresh] {
            for has_credential in [false, true] {
                for breaker in [Breaker::Up, Breaker::Open, Breaker::Offline] {
                    let f = Facts {
                        standing,
                        own: None,
                        shared: Some(NOW),
                        gitlab: Gitlab::Failed,
                        breaker,
                        unknown_identity: unknown,
                        has_credential,
                        ..base()
                    };
                    let a = decide(&f, &W);
                    let shared = matches!(a, Stale(SharedAnyone | SharedAuthenticated));
                    if breaker == Breaker::Up {
                        assert!(!shared, "{f:?} -> {a:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn imported_answers_are_never_wider_than_chosen() {
    // Exhaustive: an imported answer is served only on a sealed mirror, and a private one
    // only to the callers `offline.imported_readers` admits.
    let readers = [
        ImportedReaders::None,
        ImportedReaders::Anyone,
        ImportedReaders::Listed,
    ];
    for imported in [Bundled::Public, Bundled::Private] {
        for setting in readers {
            for listed_reader in [false, true] {
                for breaker in [Breaker::Up, Breaker::Open, Breaker::Offline] {
                    for gitlab in [Gitlab::NotAsked, Gitlab::Failed] {
                        let f = Facts {
                            standing: Standing::Unknown,
                            own: None,
                            imported: Some(imported),
                            imported_readers: setting,
                            listed_reader,
                            breaker,
                            gitlab,
                            ..base()
                        };
                        let served = decide(&f, &W) == Stale(Imported);
                        let admitted = imported == Bundled::Public
                            || setting == ImportedReaders::Anyone
                            || (setting == ImportedReaders::Listed && listed_reader);
                        let want = breaker == Breaker::Offline && admitted;
                        assert_eq!(served, want, "{f:?}");
                    }
                }
            }
        }
    }
}
