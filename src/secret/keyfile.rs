//! Opening a key file, and the checks on who else may have read it.
//!
//! The file is opened once (following symlinks: a Kubernetes Secret file is a symlink into
//! `..data/`), its owner and mode are read with `fstat` on that descriptor, and its bytes are
//! read from the same descriptor: what is checked is what is read, even if the path changes
//! in between.
//!
//! The rules, for every key file:
//! - **owned by tfmirror's effective user, or by root.** Any other owner can read the file,
//!   or open it to anyone, whenever they like. Root is accepted because the kubelet's Secret
//!   volumes belong to root, and root reads every file anyway.
//! - **nothing for others**, and **no group write**;
//! - **group read** only for a set's key file (`secret_file`), and only when the file's group
//!   is tfmirror's *effective* group: Kubernetes makes a `defaultMode: 0400` Secret 0440 for
//!   the pod's `fsGroup`, which the shipped StatefulSet sets equal to `runAsGroup`. A
//!   supplementary group is not enough: its other members are not tfmirror.
//! - the per-instance `secret.key`, which tfmirror makes 0600 itself, has no group bits at all.
//!
//! A refused file is never used, nor changed: it may have leaked, and the message says what to
//! do (never what the file holds).

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Which key file: the rules differ on group read, and the remedies differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `cache_dir/secret.key`, tfmirror's own.
    Instance,
    /// A set's `secret_file` (or `secret_previous_file`), made by an operator.
    Shared,
}

#[derive(Debug)]
pub(super) enum ReadError {
    Missing,
    Refused(String),
}

/// Why a key file's owner or mode is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exposure {
    Owner { uid: u32 },
    Others,
    GroupWrite,
    GroupRead { gid: u32 },
}

/// The process a file is checked for: its effective user and group.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reader {
    pub uid: u32,
    pub gid: u32,
}

impl Reader {
    pub(super) fn this_process() -> Reader {
        Reader {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }
}

/// May `me` use a key file of `kind` with this mode, owner and group?
pub(super) fn check(mode: u32, uid: u32, gid: u32, kind: Kind, me: Reader) -> Result<(), Exposure> {
    let mode = mode & 0o777;
    if uid != me.uid && uid != 0 {
        return Err(Exposure::Owner { uid });
    }
    if mode & 0o007 != 0 {
        return Err(Exposure::Others);
    }
    if mode & 0o020 != 0 {
        return Err(Exposure::GroupWrite);
    }
    let group_may_read = kind == Kind::Shared && gid == me.gid;
    if mode & 0o040 != 0 && !group_may_read {
        return Err(Exposure::GroupRead { gid });
    }
    Ok(())
}

/// Open `path`, check the open file, and read it.
pub(super) fn read(path: &Path, kind: Kind) -> Result<Vec<u8>, ReadError> {
    let shown = path.display();
    let refused = |why: String| ReadError::Refused(format!("{shown}: {why}"));
    // Non-blocking, so that a FIFO put there cannot hang the start; a regular file reads the
    // same either way.
    let file = File::options()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ReadError::Missing),
        Err(e) => return Err(refused(e.to_string())),
    };
    let meta = file.metadata().map_err(|e| refused(e.to_string()))?;
    if !meta.is_file() {
        return Err(refused("is not a file".into()));
    }
    let me = Reader::this_process();
    check(meta.mode() & 0o777, meta.uid(), meta.gid(), kind, me)
        .map_err(|e| refused(explain(e, &meta, kind, me)))?;
    let mut raw = Vec::new();
    (&file)
        .read_to_end(&mut raw)
        .map_err(|e| refused(e.to_string()))?;
    Ok(raw)
}

/// What is wrong, and what to do about it.
fn explain(e: Exposure, meta: &Metadata, kind: Kind, me: Reader) -> String {
    let mode = meta.mode() & 0o777;
    let what = match (e, kind) {
        (Exposure::Owner { uid }, _) => format!(
            "it belongs to uid {uid}, neither tfmirror's user (uid {}) nor root",
            me.uid
        ),
        (Exposure::Others, _) => format!("mode {mode:04o} opens it to others"),
        (Exposure::GroupWrite, _) => format!("mode {mode:04o} lets its group write it"),
        (Exposure::GroupRead { .. }, Kind::Instance) => {
            format!("mode {mode:04o} lets its group read it")
        }
        (Exposure::GroupRead { gid }, Kind::Shared) => format!(
            "mode {mode:04o} lets group {gid} read it, which is not tfmirror's effective \
             group ({})",
            me.gid
        ),
    };
    let fix = match (e, kind) {
        (Exposure::Owner { .. }, _) => {
            "or, if you are sure no one else read it, `chown` it to \
                                        tfmirror's user"
        }
        (_, Kind::Instance) => "or, if you are sure no one else read it, `chmod 600` it",
        (_, Kind::Shared) => {
            "or, if you are sure no one else read it, `chmod 400` it (in \
                              Kubernetes: `defaultMode: 0400`, `fsGroup` equal to `runAsGroup`)"
        }
    };
    let replace = match kind {
        Kind::Instance => {
            "Delete it to have a new key made at start (callers are then checked with GitLab \
             again, and download URLs handed out before stop working)"
        }
        Kind::Shared => {
            "Make a new key file (`tfmirror secret generate`) and roll it out (README, \
             \"Replicas\")"
        }
    };
    format!("{what}, so the key may have leaked: refused. {replace}, {fix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const ME: Reader = Reader {
        uid: 1000,
        gid: 2000,
    };

    #[test]
    fn owner_and_mode_rules() {
        use Exposure::*;
        use Kind::*;
        for (mode, uid, gid, kind, want) in [
            (0o600, 1000, 5, Instance, Ok(())),
            (0o400, 1000, 5, Instance, Ok(())),
            (0o100600, 1000, 5, Instance, Ok(())), // file-type bits are ignored
            (0o600, 0, 0, Instance, Ok(())),       // root's
            (0o600, 1001, 2000, Instance, Err(Owner { uid: 1001 })),
            (0o400, 1001, 2000, Shared, Err(Owner { uid: 1001 })),
            (0o644, 1000, 2000, Instance, Err(Others)),
            (0o604, 1000, 2000, Shared, Err(Others)),
            (0o602, 1000, 2000, Shared, Err(Others)),
            (0o601, 1000, 2000, Shared, Err(Others)),
            // The instance's own file: no group read, even for tfmirror's own group.
            (0o640, 1000, 2000, Instance, Err(GroupRead { gid: 2000 })),
            (0o660, 1000, 2000, Instance, Err(GroupWrite)),
            // A set's file: group read for the effective group only (Kubernetes' fsGroup).
            (0o440, 0, 2000, Shared, Ok(())),
            (0o440, 1000, 2000, Shared, Ok(())),
            (0o440, 0, 3000, Shared, Err(GroupRead { gid: 3000 })),
            (0o460, 0, 2000, Shared, Err(GroupWrite)),
            (0o420, 0, 2000, Shared, Err(GroupWrite)),
        ] {
            assert_eq!(
                check(mode, uid, gid, kind, ME),
                want,
                "{mode:04o} {uid}:{gid} {kind:?}"
            );
        }
    }

    fn key_at(dir: &Path, mode: u32) -> std::path::PathBuf {
        let p = dir.join("key");
        std::fs::write(&p, [7u8; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn refusals_say_what_to_do_and_never_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let p = key_at(dir.path(), 0o644);
        let Err(ReadError::Refused(e)) = read(&p, Kind::Instance) else {
            panic!("read");
        };
        assert!(e.starts_with(&p.display().to_string()), "{e}");
        for part in [
            "0644",
            "others",
            "may have leaked",
            "Delete it",
            "chmod 600",
        ] {
            assert!(e.contains(part), "{part}: {e}");
        }
        assert!(!e.contains('\u{7}'), "the key's bytes: {e}");
        let Err(ReadError::Refused(e)) = read(&p, Kind::Shared) else {
            panic!("read");
        };
        assert!(
            e.contains("tfmirror secret generate") && e.contains("chmod 400"),
            "{e}"
        );
        // Nothing was changed.
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert!(matches!(
            read(&dir.path().join("absent"), Kind::Shared),
            Err(ReadError::Missing)
        ));
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let Err(ReadError::Refused(e)) = read(&p, Kind::Shared) else {
            panic!("read");
        };
        assert!(e.contains("not a file"), "{e}");
    }
}
