//! The cache directory is private: directories `0700`, files `0600`.
//!
//! Tarballs of private modules and the instance secret live there, so no other local user may
//! read them. Modes are set explicitly when tfmirror creates something (not left to the umask,
//! which is often `022`); a directory or file found wider at start is reported, not changed:
//! an operator who opened it up on purpose (a group-readable volume) keeps the choice.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Mode bits of the directories tfmirror creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode bits of the files tfmirror creates.
pub const FILE_MODE: u32 = 0o600;

/// `mkdir -p` with mode 0700 for every directory it creates.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// Create (or truncate) a file with mode 0600.
pub fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Create a file that must not exist yet, readable and writable, with mode 0600.
pub fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Is this mode wider than tfmirror's own for its kind (any group or other bit set)?
pub fn too_wide(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// Entries under `root` (itself included) that group or others may access, with their mode.
/// Walks at most `limit` entries, so a start-up check on a huge cache stays bounded: the
/// directories come first (breadth-first), and they are what guards everything below them.
pub fn wider_than_private(root: &Path, limit: usize) -> io::Result<Vec<(PathBuf, u32)>> {
    let mut out = Vec::new();
    let mut queue = std::collections::VecDeque::from([root.to_path_buf()]);
    let mut seen = 0usize;
    while let Some(p) = queue.pop_front() {
        let meta = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        seen += 1;
        let mode = meta.mode() & 0o777;
        if too_wide(mode) {
            out.push((p.clone(), mode));
        }
        if seen >= limit {
            break;
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&p)? {
                queue.push_back(entry?.path());
            }
        }
    }
    Ok(out)
}

/// Warn about anything in the cache directory that is not private. Returns how many.
pub fn warn_if_open(root: &Path) -> usize {
    match wider_than_private(root, 10_000) {
        Ok(found) => {
            for (path, mode) in found.iter().take(10) {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    "cache directory entry readable by other users; tfmirror creates 0700 \
                     directories and 0600 files (chmod -R go-rwx the cache directory)"
                );
            }
            found.len()
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not check the cache directory's permissions");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_entries_are_private_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_all(&deep).unwrap();
        for p in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&dir.path().join(p)), 0o700, "{p}");
        }
        create(&deep.join("f")).unwrap();
        create_new(&deep.join("g")).unwrap();
        assert_eq!(mode(&deep.join("f")), 0o600);
        assert_eq!(mode(&deep.join("g")), 0o600);
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        assert!(wider_than_private(dir.path(), 100).unwrap().is_empty());
    }

    #[test]
    fn wider_entries_are_found() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        create_dir_all(&dir.path().join("blobs")).unwrap();
        fs::write(dir.path().join("blobs/x"), b"x").unwrap();
        fs::set_permissions(
            dir.path().join("blobs/x"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let found = wider_than_private(dir.path(), 100).unwrap();
        assert_eq!(found, vec![(dir.path().join("blobs/x"), 0o644)]);
        assert!(too_wide(0o755) && too_wide(0o640) && !too_wide(0o700) && !too_wide(0o600));
    }
}
