//! A model file's sha256, remembered beside it so a restart does not read gigabytes again.
//!
//! The memo `.FILE.sha256` in the file's directory holds the hash and the file's identity when
//! it was hashed: device, inode, size, and modification and change times to the nanosecond.
//! The change time (ctime) moves on every write, rename or `touch` and cannot be set back by
//! a user, so a file replaced or edited in place (even keeping its size, inode and mtime)
//! no longer matches and is hashed afresh. The memo is best effort: a directory that cannot
//! be written only means the hash is computed each time.

use std::fs::Metadata;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::HubError;

/// How recent a change may be for the memo to trust its timestamps: a write within the same
/// tick of a coarse file-system clock would leave them unchanged (git's "racy clean").
const SETTLED: Duration = Duration::from_secs(2);

/// The lowercase hex sha256 of `path`, from its memo when the file is unchanged since.
pub fn sha256_file_memo(path: &Path) -> Result<String, HubError> {
    hash_with_memo(path, SETTLED)
}

fn hash_with_memo(path: &Path, settled_after: Duration) -> Result<String, HubError> {
    let before = std::fs::metadata(path).map_err(|source| super::io_err(path, source))?;
    if let Some(sha) = recall(path, &before) {
        return Ok(sha);
    }
    let started = SystemTime::now();
    let sha = super::sha256_file(path)?;
    // Remember only a file that stayed the same while it was read, and whose last change
    // is old enough that a later one must move its timestamps.
    if let Ok(after) = std::fs::metadata(path) {
        let settled = changed(&after).is_some_and(|t| t + settled_after <= started);
        if settled && identity(&after) == identity(&before) {
            write(path, &sha, &after);
        }
    }
    Ok(sha)
}

/// Records `sha` as the hash of `path` as it is now: only for a download this process just
/// wrote and verified against a pinned hash, so whichever concurrent pull renamed last, the
/// bytes are the ones hashed.
pub fn remember(path: &Path, sha: &str) {
    if let Ok(meta) = std::fs::metadata(path) {
        write(path, sha, &meta);
    }
}

fn recall(path: &Path, meta: &Metadata) -> Option<String> {
    let text = std::fs::read_to_string(memo_path(path)).ok()?;
    let (sha, id) = text.trim().split_once(' ')?;
    let valid = sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (valid && id == identity(meta)).then(|| sha.to_string())
}

fn write(path: &Path, sha: &str, meta: &Metadata) {
    let memo = memo_path(path);
    let mut tmp = memo.clone().into_os_string();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let ok = std::fs::write(&tmp, format!("{sha} {}\n", identity(meta)))
        .and_then(|()| std::fs::rename(&tmp, &memo));
    if let Err(e) = ok {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(memo = %memo.display(), error = %e, "cannot write the hash memo");
    }
}

fn memo_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".sha256");
    path.with_file_name(name)
}

#[cfg(unix)]
fn identity(m: &Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "dev={} ino={} size={} mtime={}.{:09} ctime={}.{:09}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    )
}

#[cfg(not(unix))]
fn identity(m: &Metadata) -> String {
    format!("size={} mtime={:?}", m.len(), m.modified().ok())
}

/// When the file last changed: its ctime (or mtime where there is none).
#[cfg(unix)]
fn changed(m: &Metadata) -> Option<SystemTime> {
    use std::os::unix::fs::MetadataExt;
    let secs = u64::try_from(m.ctime()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, m.ctime_nsec() as u32))
}

#[cfg(not(unix))]
fn changed(m: &Metadata) -> Option<SystemTime> {
    m.modified().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memo_is_used_while_the_file_is_unchanged_and_dropped_once_it_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("m.gguf");
        std::fs::write(&file, b"GGUF first contents").unwrap();
        let real = super::super::sha256_file(&file).unwrap();
        assert_eq!(hash_with_memo(&file, Duration::ZERO).unwrap(), real);
        let memo = memo_path(&file);
        let text = std::fs::read_to_string(&memo).unwrap();
        assert!(text.starts_with(&real), "{text}");

        // A planted hash with the file's identity is returned: the file was not read again.
        let planted = "ab".repeat(32);
        std::fs::write(&memo, text.replacen(&real, &planted, 1)).unwrap();
        assert_eq!(hash_with_memo(&file, Duration::ZERO).unwrap(), planted);

        // Rewritten in place with the same size (the inode stays): hashed afresh. The pause
        // moves the kernel's coarse clock past the first write's timestamps (the tests take
        // changes as settled at once; the real rule waits two seconds).
        std::thread::sleep(std::time::Duration::from_millis(30));
        std::fs::write(&file, b"GGUF other contents").unwrap();
        let new = super::super::sha256_file(&file).unwrap();
        assert_ne!(new, real);
        assert_eq!(hash_with_memo(&file, Duration::ZERO).unwrap(), new);
        assert!(std::fs::read_to_string(&memo).unwrap().starts_with(&new));

        // A memo that is not a hash is ignored.
        std::fs::write(&memo, "not a hash at all\n").unwrap();
        assert_eq!(hash_with_memo(&file, Duration::ZERO).unwrap(), new);
    }

    #[test]
    fn an_unwritable_directory_only_costs_the_memo() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("m.gguf");
        std::fs::write(&file, b"GGUF contents").unwrap();
        // A directory where the memo's name should be: the memo cannot be written.
        std::fs::create_dir(memo_path(&file)).unwrap();
        let real = super::super::sha256_file(&file).unwrap();
        assert_eq!(hash_with_memo(&file, Duration::ZERO).unwrap(), real);
        assert_eq!(hash_with_memo(&file, Duration::ZERO).unwrap(), real);
    }

    #[test]
    fn a_file_changed_just_now_is_hashed_but_not_remembered() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("m.gguf");
        std::fs::write(&file, b"GGUF fresh contents").unwrap();
        let real = super::super::sha256_file(&file).unwrap();
        assert_eq!(sha256_file_memo(&file).unwrap(), real);
        assert!(!memo_path(&file).exists());
        // Once its last change is settled, it is.
        assert_eq!(hash_with_memo(&file, Duration::ZERO).unwrap(), real);
        assert!(memo_path(&file).exists());
    }
}
