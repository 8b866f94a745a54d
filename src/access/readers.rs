//! `offline.imported_readers` at run time: whether a caller may read imported private
//! modules, the listed readers re-read from `offline.readers_file` when it changes (so
//! `tfmirror bundle reader add` takes effect without a restart).
//!
//! Fails closed: a readers file that vanished or no longer parses admits no one until it is
//! fixed, and says so in the log once per change.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;

use crate::config::{ImportedReaders, OfflineConfig};
use crate::secret::readers::{self, ReaderHash};
use crate::secret::Secret;

/// How often the file's modification time is looked at, at most.
const RECHECK: Duration = Duration::from_secs(1);

pub struct Readers {
    setting: ImportedReaders,
    file: Option<PathBuf>,
    secret: Secret,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    checked: Option<Instant>,
    /// (modification time, length) of the file as last read.
    seen: Option<(SystemTime, u64)>,
    hashes: Arc<HashSet<ReaderHash>>,
}

impl Readers {
    pub fn new(offline: &OfflineConfig, secret: Secret) -> Readers {
        Readers {
            setting: offline.imported_readers,
            file: offline.readers_file.clone(),
            secret,
            state: Mutex::default(),
        }
    }

    pub fn setting(&self) -> ImportedReaders {
        self.setting
    }

    /// Is the credential in `authorization` one of the listed readers? Always false unless
    /// the setting is `listed`.
    pub async fn lists(&self, authorization: Option<&HeaderValue>) -> bool {
        if self.setting != ImportedReaders::Listed {
            return false;
        }
        let Some(hash) =
            authorization.and_then(|a| self.secret.reader_hash_of_header(a.as_bytes()))
        else {
            return false;
        };
        self.hashes().await.contains(&hash)
    }

    /// The listed hashes, re-read off the runtime when the file changed.
    async fn hashes(&self) -> Arc<HashSet<ReaderHash>> {
        let Some(file) = self.file.clone() else {
            return Arc::default();
        };
        {
            let mut st = self.state.lock().expect("readers state");
            let now = Instant::now();
            if st
                .checked
                .is_some_and(|at| now.duration_since(at) < RECHECK)
            {
                return st.hashes.clone();
            }
            st.checked = Some(now);
        }
        let seen = self.state.lock().expect("readers state").seen;
        let read = tokio::task::spawn_blocking(move || reread(&file, seen)).await;
        let mut st = self.state.lock().expect("readers state");
        match read {
            Ok(Reread::Same) => {}
            Ok(Reread::Changed(stamp, hashes)) => {
                st.seen = stamp;
                st.hashes = Arc::new(hashes);
            }
            Ok(Reread::Failed(stamp, why)) => {
                if st.seen != stamp || !st.hashes.is_empty() {
                    tracing::error!(error = %why, "offline.readers_file cannot be read: no one is admitted to imported private modules until it is fixed");
                }
                st.seen = stamp;
                st.hashes = Arc::default();
            }
            Err(_) => st.hashes = Arc::default(),
        }
        st.hashes.clone()
    }
}

enum Reread {
    Same,
    Changed(Option<(SystemTime, u64)>, HashSet<ReaderHash>),
    Failed(Option<(SystemTime, u64)>, String),
}

fn reread(file: &std::path::Path, seen: Option<(SystemTime, u64)>) -> Reread {
    let stamp = std::fs::metadata(file)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())));
    if stamp.is_some() && stamp == seen {
        return Reread::Same;
    }
    match readers::read(file) {
        Ok(h) => Reread::Changed(stamp, h),
        Err(e) => Reread::Failed(stamp, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(file: PathBuf) -> (Readers, Secret) {
        let secret = Secret::from_master(&[3u8; 32]);
        let cfg = OfflineConfig {
            imported_readers: ImportedReaders::Listed,
            readers_file: Some(file),
            ..OfflineConfig::default()
        };
        (Readers::new(&cfg, secret.clone()), secret)
    }

    fn bearer(t: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {t}")).unwrap()
    }

    #[tokio::test]
    async fn listed_readers_follow_the_file_and_a_broken_file_admits_no_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("readers");
        let (r, secret) = listed(file.clone());
        std::fs::write(&file, readers::line(&secret.reader_hash(b"alice"), None)).unwrap();
        assert!(r.lists(Some(&bearer("alice"))).await);
        assert!(!r.lists(Some(&bearer("bob"))).await);
        assert!(!r.lists(None).await);

        // Bob is added (a longer file: seen as changed even within the same mtime tick).
        let both = format!(
            "{}{}",
            readers::line(&secret.reader_hash(b"alice"), None),
            readers::line(&secret.reader_hash(b"bob"), Some("bob"))
        );
        std::fs::write(&file, both).unwrap();
        r.state.lock().unwrap().checked = None;
        assert!(r.lists(Some(&bearer("bob"))).await);

        std::fs::write(&file, "not a hash\n").unwrap();
        r.state.lock().unwrap().checked = None;
        assert!(!r.lists(Some(&bearer("alice"))).await, "fails closed");
        std::fs::remove_file(&file).unwrap();
        r.state.lock().unwrap().checked = None;
        assert!(!r.lists(Some(&bearer("alice"))).await, "fails closed");
    }

    #[tokio::test]
    async fn only_the_listed_setting_reads_a_list() {
        let secret = Secret::from_master(&[3u8; 32]);
        for setting in [ImportedReaders::None, ImportedReaders::Anyone] {
            let cfg = OfflineConfig {
                imported_readers: setting,
                ..OfflineConfig::default()
            };
            let r = Readers::new(&cfg, secret.clone());
            assert!(!r.lists(Some(&bearer("alice"))).await);
        }
    }
}
