//! Re-published versions: GitLab lets a package version be deleted and uploaded again with
//! other bytes, while tfmirror's index says tarballs are immutable per version.
//!
//! **What GitLab offers to notice it.** Nothing on the module routes: the versions listing,
//! a version's metadata, `/download` and `/file` carry no digest
//! (gitlabhq `lib/api/terraform/modules/v1/namespace_packages.rb`; `/file` is
//! `present_package_file!(package_file)`, a redirect or the bytes). The Packages API has one,
//! `package_files[].file_sha256` (`GET /projects/:id/packages/:package_id/package_files`,
//! entity `lib/api/entities/package_file.rb`), but it needs the project id, which namespace
//! routes never reveal, and a credential the REST API accepts (not the JWT of `/file`). The
//! object-storage key behind `/file`'s 302 exists only with object storage, and reading it
//! costs a request per check anyway.
//!
//! **What tfmirror does instead (re-download, compared).**
//! - A version that *vanishes from a versions listing and comes back* may have other bytes.
//!   When a fresh listing from GitLab shows versions the module's previous listing did not
//!   ([`reappeared`]), each is noted with the time ([`Reappeared`]). A cached tarball of that
//!   version fetched before then is not served: the next download refills it from GitLab
//!   ([`needs_refill`]), on every route (namespace and project keys alike, matched by
//!   `name/system@version`). So new bytes are served within one listing refresh.
//! - Every fill of a version already indexed compares blake3 ([`after_fill`]): other bytes are
//!   a re-publish, logged, counted (`tfmirror_republished_total`) and kept in the entry's
//!   history, which `tfmirror cache ls` shows (supply-chain evidence).
//!
//! Limit: a delete and re-upload that both happen between two listings tfmirror fetches leave
//! the listing unchanged, and nothing GitLab serves on these routes tells them apart; such a
//! version keeps its first bytes until it is refilled for another reason (eviction, purge).

use std::collections::HashMap;
use std::sync::RwLock;

use super::meta::MetaStore;
use super::records::{version_id, Reappeared as Record, Replaced, TarballEntry, KIND_REAPPEARED};

/// How many earlier digests an entry keeps.
const HISTORY: usize = 16;

/// Versions seen reappearing in a listing, in memory (loaded at start, few), and on disk.
#[derive(Debug, Default)]
pub struct Reappeared {
    at: RwLock<HashMap<String, u64>>,
}

impl Reappeared {
    /// Load the records of earlier runs (blocking).
    pub fn load(meta: &MetaStore) -> Reappeared {
        let at = meta
            .scan::<Record>(KIND_REAPPEARED)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, r)| (k, r.at_ms))
            .collect();
        Reappeared {
            at: RwLock::new(at),
        }
    }

    /// `version_id` (see `records::version_id`) reappeared at `now_ms` (blocking: writes a record).
    pub fn note(&self, meta: &MetaStore, version_id: &str, now_ms: u64) {
        self.at
            .write()
            .expect("reappeared lock")
            .insert(version_id.to_string(), now_ms);
        if let Err(e) = meta.put(KIND_REAPPEARED, version_id, &Record { at_ms: now_ms }) {
            tracing::warn!(error = %e, "could not record a reappeared version (kept in memory)");
        }
    }

    /// When (milliseconds) the version of tarball index `key` was last seen reappearing.
    pub fn since(&self, key: &str) -> Option<u64> {
        let id = version_id(key)?;
        self.at.read().expect("reappeared lock").get(id).copied()
    }
}

/// The versions a fresh listing shows that the module's previous listing did not. Without a
/// previous listing nothing is known to have come back.
pub fn reappeared(previous: Option<&[String]>, now: &[String]) -> Vec<String> {
    match previous {
        None => Vec::new(),
        Some(prev) => now.iter().filter(|v| !prev.contains(v)).cloned().collect(),
    }
}

/// Must this cached entry be refilled before it is served? When its bytes were fetched no
/// later than the version's reappearance (milliseconds; entries of older releases carry
/// seconds only and count from the start of theirs).
pub fn needs_refill(entry: &TarballEntry, reappeared_at_ms: Option<u64>) -> bool {
    let fetched_ms = match entry.fetched_at_ms {
        0 => entry.fetched_at.saturating_mul(1000),
        ms => ms,
    };
    reappeared_at_ms.is_some_and(|at| fetched_ms <= at)
}

/// The index entry after a fill of `hash`, given the one before; `Some` when the bytes
/// differ from the previous ones (a re-publish).
pub fn after_fill(
    previous: Option<&TarballEntry>,
    hash: String,
    size: u64,
    now_ms: u64,
) -> (TarballEntry, Option<Replaced>) {
    let now = now_ms / 1000;
    let mut replaced = previous.map(|p| p.replaced.clone()).unwrap_or_default();
    let change = previous.filter(|p| p.hash != hash).map(|p| Replaced {
        hash: p.hash.clone(),
        size: p.size,
        fetched_at: p.fetched_at,
        replaced_at: now,
    });
    if let Some(c) = &change {
        replaced.push(c.clone());
        let excess = replaced.len().saturating_sub(HISTORY);
        replaced.drain(..excess);
    }
    let entry = TarballEntry {
        hash,
        size,
        fetched_at: now,
        fetched_at_ms: now_ms,
        replaced,
    };
    (entry, change)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(hash: &str, fetched_at: u64) -> TarballEntry {
        TarballEntry {
            hash: hash.into(),
            size: 10,
            fetched_at,
            fetched_at_ms: 0,
            replaced: Vec::new(),
        }
    }

    #[test]
    fn version_ids_are_shared_by_namespace_and_project_keys() {
        for (key, id) in [
            ("infra/vpc/aws@1.0.0", Some("vpc/aws@1.0.0")),
            ("project:7/vpc/aws@1.0.0", Some("vpc/aws@1.0.0")),
            ("a/b/vpc/aws@1.0.0-rc.1+b", Some("vpc/aws@1.0.0-rc.1+b")),
            ("vpc@1.0.0", None),
            ("infra/vpc/aws", None),
        ] {
            assert_eq!(version_id(key), id, "{key}");
        }
    }

    #[test]
    fn versions_that_come_back_are_the_ones_missing_before() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        for (prev, now, back) in [
            (None, s(&["1.0.0"]), s(&[])),
            (Some(s(&["1.0.0", "1.1.0"])), s(&["1.0.0", "1.1.0"]), s(&[])),
            (Some(s(&["1.1.0"])), s(&["1.0.0", "1.1.0"]), s(&["1.0.0"])),
            (Some(s(&[])), s(&["1.0.0"]), s(&["1.0.0"])),
            (Some(s(&["1.0.0", "1.1.0"])), s(&["1.1.0"]), s(&[])),
        ] {
            assert_eq!(
                reappeared(prev.as_deref(), &now),
                back,
                "{prev:?} -> {now:?}"
            );
        }
    }

    #[test]
    fn entries_fetched_before_a_reappearance_are_refilled() {
        for (fetched, at_ms, refill) in [
            (100, None, false),
            (100, Some(200_000), true),
            (200, Some(200_000), true),
            (200, Some(200_500), true),
            (201, Some(200_500), false),
        ] {
            assert_eq!(needs_refill(&entry("a", fetched), at_ms), refill);
        }
        // Milliseconds, when the entry has them: a refill in the same second is after.
        let mut e = entry("a", 200);
        e.fetched_at_ms = 200_600;
        assert!(!needs_refill(&e, Some(200_500)));
        assert!(needs_refill(&e, Some(200_600)));
    }

    #[test]
    fn other_bytes_after_a_fill_are_a_republish_kept_in_history() {
        let (first, change) = after_fill(None, "a".into(), 10, 100_000);
        assert!(change.is_none());
        let (same, change) = after_fill(Some(&first), "a".into(), 10, 200_250);
        assert!(change.is_none());
        assert_eq!((same.fetched_at, same.fetched_at_ms), (200, 200_250));
        assert_eq!(same.replaced.len(), 0);
        let (new, change) = after_fill(Some(&same), "b".into(), 12, 300_000);
        let change = change.expect("a re-publish");
        assert_eq!(
            (change.hash.as_str(), change.fetched_at, change.replaced_at),
            ("a", 200, 300)
        );
        assert_eq!(new.hash, "b");
        assert_eq!(new.replaced, vec![change]);
        // History is bounded.
        let mut e = new;
        for i in 0..40 {
            e = after_fill(Some(&e), format!("h{i}"), 1, 400_000 + i).0;
        }
        assert_eq!(e.replaced.len(), HISTORY);
        assert_eq!(e.replaced.last().unwrap().hash, "h38");
    }
}
