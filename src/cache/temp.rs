//! Temp files that a crash cannot turn into a collision or a leak.
//!
//! Each store opened by a process gets a *run*: a directory `tmp/<pid>-<random>/` for its temp
//! files, and a lock file `tmp/<pid>-<random>.lock` held with `flock` for as long as the store
//! lives. The random part makes names unique per process start even when every start has the
//! same pid (PID 1 in a container); the lock tells a live run (a graceful upgrade's other
//! process) from a dead one (`kill -9`, OOM, power loss) without trusting pids at all: the
//! kernel drops a dead process's locks. At start, runs whose lock can be taken are removed
//! and counted; nothing of a live run is ever touched.
//!
//! The lock file gets its final name only once it is locked (it is created as `.locking`), so
//! a cleaner can never take the lock of a run that is still being set up.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

use super::private;

/// Loose files in `tmp/` (older tfmirror versions named temp files `<pid>-<n>.part` there, and
/// runs being set up) are removed only when older than this: their writer may be alive.
pub const STALE_LOOSE: Duration = Duration::from_secs(3600);

const LOCK: &str = "lock";
const LOCKING: &str = "locking";

pub struct Run {
    dir: PathBuf,
    lock_path: PathBuf,
    counter: AtomicU64,
    _lock: Flock<File>,
}

impl Run {
    /// Start a run under `cache_dir/tmp`.
    pub fn start(cache_dir: &Path) -> io::Result<Run> {
        let tmp = cache_dir.join("tmp");
        private::create_dir_all(&tmp)?;
        let mut raw = [0u8; 8];
        getrandom::getrandom(&mut raw).map_err(io::Error::other)?;
        let nonce: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let id = format!("{}-{nonce}", std::process::id());
        let locking = tmp.join(format!("{id}.{LOCKING}"));
        let lock = Flock::lock(
            private::create_new(&locking)?,
            FlockArg::LockExclusiveNonblock,
        )
        .map_err(|(_, e)| io::Error::from(e))?;
        let dir = tmp.join(&id);
        private::create_dir_all(&dir)?;
        let lock_path = tmp.join(format!("{id}.{LOCK}"));
        fs::rename(&locking, &lock_path)?;
        Ok(Run {
            dir,
            lock_path,
            counter: AtomicU64::new(0),
            _lock: lock,
        })
    }

    /// A fresh temp file path in this run; `tag` tells kinds apart when reading a listing.
    pub fn path(&self, tag: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{n}{tag}.part"))
    }

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Run {
    /// A clean exit leaves nothing behind (a dead run is removed by the next start).
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_file(&self.lock_path);
    }
}

/// What a clean-up removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Leftovers {
    pub files: u64,
    pub bytes: u64,
}

impl Leftovers {
    fn add(&mut self, other: Leftovers) {
        self.files += other.files;
        self.bytes += other.bytes;
    }
}

/// Remove the temp files of dead runs (and loose temp files older than [`STALE_LOOSE`]) under
/// `cache_dir/tmp`. Live runs, this process's included, are left alone.
pub fn remove_dead(cache_dir: &Path) -> io::Result<Leftovers> {
    let tmp = cache_dir.join("tmp");
    let mut removed = Leftovers::default();
    let entries = match fs::read_dir(&tmp) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue; // removed meanwhile
        };
        if let Some(id) = name.strip_suffix(&format!(".{LOCK}")) {
            // Taking the lock proves its run is dead; it is released when `held` drops, after
            // the run's files are gone.
            let Ok(file) = File::open(&path) else {
                continue;
            };
            let Ok(held) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                continue; // alive
            };
            removed.add(remove_tree(&tmp.join(id)));
            let _ = fs::remove_file(&path);
            drop(held);
        } else if meta.is_dir() {
            // A run directory whose lock file is gone: its owner died while setting up, or a
            // cleaner already took its lock. Left alone while young, as a loose file would be.
            let has_lock = tmp.join(format!("{name}.{LOCK}")).exists();
            if !has_lock && is_old(&meta) {
                removed.add(remove_tree(&path));
            }
        } else if is_old(&meta) && fs::remove_file(&path).is_ok() {
            removed.add(Leftovers {
                files: 1,
                bytes: meta.len(),
            });
        }
    }
    Ok(removed)
}

fn is_old(meta: &fs::Metadata) -> bool {
    meta.modified()
        .ok()
        .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
        .and_then(|m| crate::clock::now().checked_sub(m.as_secs()))
        .is_some_and(|age| age > STALE_LOOSE.as_secs())
}

/// Remove a run directory, counting its files.
fn remove_tree(dir: &Path) -> Leftovers {
    let mut out = Leftovers::default();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let len = e.metadata().map_or(0, |m| m.len());
            if fs::remove_file(e.path()).is_ok() {
                out.files += 1;
                out.bytes += len;
            }
        }
    }
    let _ = fs::remove_dir(dir);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_runs_of_one_pid_never_share_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let a = Run::start(dir.path()).unwrap();
        let b = Run::start(dir.path()).unwrap();
        assert_ne!(a.dir(), b.dir());
        let (pa, pb) = (a.path(""), b.path(""));
        assert_ne!(pa, pb);
        private::create_new(&pa).unwrap();
        private::create_new(&pb).unwrap();
    }

    #[test]
    fn live_runs_stay_dead_runs_go_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let live = Run::start(dir.path()).unwrap();
        fs::write(live.path(""), b"in flight").unwrap();
        // A dead run as `kill -9` leaves it: a directory with a partial file, and an unlocked
        // lock file.
        let dead = dir.path().join("tmp/1-deadbeefdeadbeef");
        fs::create_dir_all(&dead).unwrap();
        fs::write(dead.join("0.part"), b"partial body").unwrap();
        fs::write(dir.path().join("tmp/1-deadbeefdeadbeef.lock"), b"").unwrap();
        // A young loose file (another version's temp file): kept.
        fs::write(dir.path().join("tmp/7-0.part"), b"young").unwrap();

        let removed = remove_dead(dir.path()).unwrap();
        assert_eq!(
            removed,
            Leftovers {
                files: 1,
                bytes: 12
            }
        );
        assert!(!dead.exists());
        assert!(!dir.path().join("tmp/1-deadbeefdeadbeef.lock").exists());
        assert_eq!(
            fs::read_dir(live.dir()).unwrap().count(),
            1,
            "live run untouched"
        );
        assert!(dir.path().join("tmp/7-0.part").exists());

        // The run's own clean exit removes everything it had.
        let live_dir = live.dir().to_path_buf();
        drop(live);
        assert!(!live_dir.exists());
    }
}
