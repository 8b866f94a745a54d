//! What to do with a cached provider version list: a pure decision from its age, the
//! configured windows and whether the upstream may be asked now.

/// The plan for one version-list request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Fresh: serve it (`HIT`).
    Hit,
    /// Past `listing_ttl`, within `stale_while_revalidate`: serve it and refresh in the
    /// background (`UPDATING`).
    Updating,
    /// Ask the upstream; `fallback` says whether the cached list may be served
    /// (stale-if-error) if that fails.
    Ask { fallback: bool },
    /// The upstream may not be asked (offline, breaker open), but the list is within
    /// `stale_if_error`: serve it (`STALE`).
    Stale,
    /// Nothing usable and the upstream may not be asked.
    Unavailable,
}

use crate::windows::Age;
pub use crate::windows::Windows;

/// Whether the registry may be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    Available,
    /// Its breaker is open: it failed just now.
    Failing,
    /// A sealed mirror (`offline.enabled`): no registry will ever be asked, so a cached list
    /// (imported, or fetched before sealing) is served whatever its age.
    Sealed,
}

/// `age`: seconds since the cached list was fetched, None when there is none.
pub fn plan(age: Option<u64>, w: Windows, upstream: Upstream) -> Plan {
    let upstream_available = upstream == Upstream::Available;
    if upstream == Upstream::Sealed && age.is_some_and(|a| w.age(a) != Age::Fresh) {
        return Plan::Stale;
    }
    let Some(age) = age else {
        return if upstream_available {
            Plan::Ask { fallback: false }
        } else {
            Plan::Unavailable
        };
    };
    let usable_stale = w.serves_on_error(age);
    match (w.age(age), upstream_available) {
        (Age::Fresh, _) => Plan::Hit,
        (_, false) if usable_stale => Plan::Stale,
        (_, false) => Plan::Unavailable,
        (Age::Revalidate, true) => Plan::Updating,
        (Age::Expired, true) => Plan::Ask {
            fallback: usable_stale,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        let w = Windows {
            ttl: 30,
            revalidate: 300,
            stale_if_error: 3600,
        };
        use Upstream::*;
        for (age, up, want) in [
            (None, Available, Plan::Ask { fallback: false }),
            (None, Failing, Plan::Unavailable),
            (Some(0), Available, Plan::Hit),
            (Some(29), Failing, Plan::Hit),
            // Exactly `ttl` old is past fresh, as a module listing is (`crate::windows`).
            (Some(30), Available, Plan::Updating),
            (Some(30), Failing, Plan::Stale),
            (Some(329), Available, Plan::Updating),
            (Some(330), Available, Plan::Ask { fallback: true }),
            (Some(3629), Failing, Plan::Stale),
            (Some(3630), Failing, Plan::Unavailable),
            (Some(3630), Available, Plan::Ask { fallback: false }),
            (None, Sealed, Plan::Unavailable),
            (Some(29), Sealed, Plan::Hit),
            (Some(30), Sealed, Plan::Stale),
            // Sealed, a list never ages out: nothing newer can come.
            (Some(3630), Sealed, Plan::Stale),
            (Some(10 * 365 * 86400), Sealed, Plan::Stale),
        ] {
            assert_eq!(plan(age, w, up), want, "age {age:?}, {up:?}");
        }
    }
}
