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

#[derive(Debug, Clone, Copy)]
pub struct Windows {
    pub ttl: u64,
    pub stale_while_revalidate: u64,
    pub stale_if_error: u64,
}

/// `age`: seconds since the cached list was fetched, None when there is none.
pub fn plan(age: Option<u64>, w: Windows, upstream_available: bool) -> Plan {
    let Some(age) = age else {
        return if upstream_available {
            Plan::Ask { fallback: false }
        } else {
            Plan::Unavailable
        };
    };
    let usable_stale = age <= w.ttl.saturating_add(w.stale_if_error);
    if age <= w.ttl {
        Plan::Hit
    } else if !upstream_available {
        if usable_stale {
            Plan::Stale
        } else {
            Plan::Unavailable
        }
    } else if age <= w.ttl.saturating_add(w.stale_while_revalidate) {
        Plan::Updating
    } else {
        Plan::Ask {
            fallback: usable_stale,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        let w = Windows {
            ttl: 30,
            stale_while_revalidate: 300,
            stale_if_error: 3600,
        };
        for (age, up, want) in [
            (None, true, Plan::Ask { fallback: false }),
            (None, false, Plan::Unavailable),
            (Some(0), true, Plan::Hit),
            (Some(30), false, Plan::Hit),
            (Some(31), true, Plan::Updating),
            (Some(330), true, Plan::Updating),
            (Some(331), true, Plan::Ask { fallback: true }),
            (Some(31), false, Plan::Stale),
            (Some(3630), false, Plan::Stale),
            (Some(3631), false, Plan::Unavailable),
            (Some(3631), true, Plan::Ask { fallback: false }),
        ] {
            assert_eq!(plan(age, w, up), want, "age {age:?}, up {up}");
        }
    }
}
