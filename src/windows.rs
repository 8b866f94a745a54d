//! Freshness windows: how old a cached answer may be, and what it is good for at its age.
//! Module listings (`access::policy`) and provider lists (`providers::freshness`) both read
//! their age here, so an answer of a given age means the same thing on both sides.
//!
//! One boundary convention, RFC 9111's (§4.2: fresh while `freshness_lifetime > age`): every
//! window is half-open. An answer exactly `ttl` seconds old is no longer fresh; exactly
//! `ttl + revalidate` old, it is no longer served while it is refreshed; exactly
//! `ttl + stale_if_error` old, it is no longer served when the upstream fails.

/// The windows of one kind of cached answer, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// `cache.listing_ttl`: served as fresh.
    pub ttl: u64,
    /// `cache.stale_while_revalidate`: past `ttl`, served while a refresh runs.
    pub revalidate: u64,
    /// `cache.stale_if_error`: past `ttl`, served only while the upstream fails.
    pub stale_if_error: u64,
}

/// What an answer of a given age is good for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Age {
    /// Younger than `ttl`: served as is.
    Fresh,
    /// Past `ttl`, younger than `ttl + revalidate`: served while it is refreshed.
    Revalidate,
    /// Past both: asked for again; what the upstream's failure allows is
    /// [`Windows::serves_on_error`]'s to say.
    Expired,
}

impl Windows {
    /// What an answer `secs` seconds old is good for while the upstream answers.
    pub fn age(&self, secs: u64) -> Age {
        if secs < self.ttl {
            Age::Fresh
        } else if secs < self.ttl.saturating_add(self.revalidate) {
            Age::Revalidate
        } else {
            Age::Expired
        }
    }

    /// May an answer `secs` seconds old be served because the upstream failed or cannot be
    /// asked (stale-if-error)?
    pub fn serves_on_error(&self, secs: u64) -> bool {
        secs < self.ttl.saturating_add(self.stale_if_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The edges, pinned once for every kind of cached answer.
    #[test]
    fn every_window_is_half_open() {
        let w = Windows {
            ttl: 30,
            revalidate: 300,
            stale_if_error: 3600,
        };
        #[rustfmt::skip]
        let rows = [
            // age, while the upstream answers, served on its failure
            (0,    Age::Fresh,      true),
            (29,   Age::Fresh,      true),
            (30,   Age::Revalidate, true),
            (329,  Age::Revalidate, true),
            (330,  Age::Expired,    true),
            (3629, Age::Expired,    true),
            (3630, Age::Expired,    false),
        ];
        for (secs, age, on_error) in rows {
            assert_eq!(w.age(secs), age, "age {secs}");
            assert_eq!(w.serves_on_error(secs), on_error, "age {secs} on error");
        }
        let never = Windows {
            ttl: 0,
            revalidate: 0,
            stale_if_error: 0,
        };
        assert_eq!(never.age(0), Age::Expired);
        assert!(!never.serves_on_error(0));
        let forever = Windows {
            ttl: u64::MAX,
            revalidate: u64::MAX,
            stale_if_error: u64::MAX,
        };
        assert_eq!(forever.age(u64::MAX - 1), Age::Fresh);
    }
}
