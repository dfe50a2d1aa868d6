//! Fetching models: resolve a spec against the manifest, try each source in order, verify the
//! sha256, and move the file into place atomically.
//!
//! Knows files, hashes and download sources; never GGUF contents. Invariant: the final path
//! only ever holds a complete file (data is written to `FILE.part` and renamed), and a file
//! whose checksum does not match is never left under the final name.

pub mod manifest;
mod memo;
mod progress;
mod sources;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use manifest::{Manifest, ModelEntry, Source};
pub use memo::sha256_file_memo;
use progress::Progress;

use crate::error::HubError;

/// Environment variable naming the models directory (default `models`).
pub const MODELS_DIR_ENV: &str = "EDGEINFER_MODELS_DIR";

pub fn models_dir() -> PathBuf {
    std::env::var_os(MODELS_DIR_ENV).map_or_else(|| PathBuf::from("models"), PathBuf::from)
}

/// Where `entry` lives once pulled.
pub fn local_path(entry: &ModelEntry, dir: &Path) -> PathBuf {
    dir.join(&entry.file)
}

/// Makes sure `entry` is present and verified under `dir`, fetching it if needed.
/// Returns its path. A present, verified file is not fetched again.
///
/// Pulls of the same file (servers started together, say) take turns: the later ones wait
/// for the first (`.FILE.lock`), then find its file. The partial files a crashed pull left
/// are removed.
pub fn pull(entry: &ModelEntry, dir: &Path) -> Result<PathBuf, HubError> {
    let dest = local_path(entry, dir);
    if present(entry, &dest)? {
        return Ok(dest);
    }
    std::fs::create_dir_all(dir).map_err(|source| io_err(dir, source))?;
    let turn = take_turn(&dest)?;
    // Only with the turn held is no live pull writing them.
    if turn.is_some() {
        remove_orphans(&dest);
    }
    if present(entry, &dest)? {
        return Ok(dest);
    }
    let mut attempts = Vec::new();
    for source in &entry.sources {
        let label = sources::describe(source);
        tracing::info!(source = %label, "fetching {}", entry.file);
        match sources::fetch(source, &dest, entry.sha256.as_deref()) {
            Ok(()) => {
                tracing::info!(path = %dest.display(), "model ready");
                return Ok(dest);
            }
            Err(e) => {
                tracing::warn!(source = %label, error = %e, "source failed");
                attempts.push(format!("  - {label}: {e}"));
            }
        }
    }
    Err(HubError::AllSourcesFailed {
        what: entry.name.clone(),
        attempts: attempts.join("\n"),
    })
}

/// Whether `dest` is there and, when the entry has a sha256, verified.
fn present(entry: &ModelEntry, dest: &Path) -> Result<bool, HubError> {
    if !dest.exists() {
        return Ok(false);
    }
    let Some(expected) = &entry.sha256 else {
        return Ok(true);
    };
    let actual = sha256_file_memo(dest)?;
    if &actual == expected {
        tracing::info!(path = %dest.display(), "model present and verified");
        return Ok(true);
    }
    tracing::warn!(path = %dest.display(), %expected, %actual,
        "present file has the wrong checksum; fetching it again");
    Ok(false)
}

/// A name beside `dest`: `.FILE` followed by `suffix`.
fn beside(dest: &Path, suffix: &str) -> PathBuf {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    dest.with_file_name(format!(".{name}{suffix}"))
}

/// Waits for this file's turn: an exclusive lock on `.FILE.lock`, held until the returned
/// file is dropped (or the process ends, a crash included). On a file system without locks
/// the pull goes on without one (as before: its partial file is its own).
fn take_turn(dest: &Path) -> Result<Option<File>, HubError> {
    let path = beside(dest, ".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| io_err(&path, source))?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => {
            tracing::info!(path = %dest.display(), "another pull is fetching this file; waiting for it");
            f.lock().map_err(|source| io_err(&path, source))?;
            Ok(Some(f))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot lock; pulling without waiting for other pulls");
            Ok(None)
        }
    }
}

/// Removes what crashed pulls of `dest` left: `FILE.PID.part` files and `.FILE.pip-PID`
/// folders of other processes. Called with the file's turn held, so no live pull owns them.
fn remove_orphans(dest: &Path) {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
        return;
    };
    let name = name.to_string_lossy();
    let ours = std::process::id().to_string();
    let (part, pip) = (format!("{name}."), format!(".{name}.pip-"));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let file = e.file_name().to_string_lossy().into_owned();
        let pid = file
            .strip_prefix(&part)
            .and_then(|rest| rest.strip_suffix(".part"))
            .or_else(|| file.strip_prefix(&pip));
        let Some(pid) = pid.filter(|p| p.bytes().all(|b| b.is_ascii_digit()) && *p != ours) else {
            continue;
        };
        let path = e.path();
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match gone {
            Ok(()) => {
                tracing::info!(path = %path.display(), pid, "removed what a stopped pull left")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove what a stopped pull left")
            }
        }
    }
}

/// Copies `reader` (of `size` bytes if known) to `dest` through `DEST.part`, hashing as it
/// goes; renames into place only if the hash matches `expected` (when given).
fn install_from_reader(
    mut reader: impl Read,
    size: Option<u64>,
    dest: &Path,
    expected: Option<&str>,
    label: &str,
) -> Result<(), HubError> {
    let part = part_path(dest);
    let result = (|| {
        let mut out = File::create(&part).map_err(|source| io_err(&part, source))?;
        let mut hasher = Sha256::new();
        let mut progress = Progress::new(label, size);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|source| io_err(dest, source))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|source| io_err(&part, source))?;
            progress.advance(n as u64);
        }
        out.sync_all().map_err(|source| io_err(&part, source))?;
        progress.finish();
        let actual = hex(&hasher.finalize());
        if let Some(expected) = expected {
            if actual != expected {
                return Err(HubError::Checksum {
                    path: dest.to_path_buf(),
                    expected: expected.into(),
                    actual,
                });
            }
        }
        std::fs::rename(&part, dest).map_err(|source| io_err(dest, source))?;
        if expected.is_some() {
            memo::remember(dest, &actual);
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

/// A temporary name next to `dest`, unique per process so concurrent pulls cannot truncate
/// each other's data.
fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.part", std::process::id()));
    dest.with_file_name(name)
}

/// The lowercase hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, HubError> {
    let mut f = File::open(path).map_err(|source| io_err(path, source))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher).map_err(|source| io_err(path, source))?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(path: &Path, source: std::io::Error) -> HubError {
    HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(sources: Vec<Source>, sha: Option<String>) -> ModelEntry {
        ModelEntry {
            name: "test-model".into(),
            description: String::new(),
            file: "test.gguf".into(),
            sha256: sha,
            sources,
        }
    }

    #[test]
    fn falls_back_verifies_and_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("mirror.gguf");
        std::fs::write(&src, b"GGUF pretend model bytes").unwrap();
        let sha = sha256_file(&src).unwrap();
        let dir = tmp.path().join("models");
        let missing = tmp.path().join("nowhere.gguf").display().to_string();
        let e = entry(
            vec![
                Source::Path { path: missing },
                Source::Path {
                    path: src.display().to_string(),
                },
            ],
            Some(sha),
        );
        let dest = pull(&e, &dir).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"GGUF pretend model bytes");
        assert!(!part_path(&dest).exists());
        // The download's hash is remembered, so the next start need not read the file again.
        let memo = std::fs::read_to_string(dir.join(".test.gguf.sha256")).unwrap();
        assert!(memo.starts_with(e.sha256.as_deref().unwrap()), "{memo}");
        // A second pull finds the verified file and does not touch the sources.
        std::fs::remove_file(&src).unwrap();
        assert_eq!(pull(&e, &dir).unwrap(), dest);
    }

    #[test]
    fn checksum_mismatch_leaves_no_file() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("mirror.gguf");
        std::fs::write(&src, b"tampered").unwrap();
        let dir = tmp.path().join("models");
        let e = entry(
            vec![Source::Path {
                path: src.display().to_string(),
            }],
            Some("0".repeat(64)),
        );
        let err = pull(&e, &dir).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        assert!(!dir.join("test.gguf").exists());
        assert_eq!(leftovers(&dir), Vec::<String>::new());
    }

    /// Files in `dir` but the empty lock files (a failed pull must leave none, `.part` files
    /// included).
    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.ends_with(".lock"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Another process pulling the same file holds its turn: this pull waits, removes what
    /// a crashed pull left, and finds the other's file instead of fetching its own.
    #[test]
    fn a_second_pull_waits_for_the_first_and_takes_its_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("models");
        std::fs::create_dir_all(&dir).unwrap();
        let bytes = b"GGUF the first pull's bytes";
        let staged = tmp.path().join("staged");
        std::fs::write(&staged, bytes).unwrap();
        let e = entry(
            // A source that cannot be fetched: the pull must not need it.
            vec![Source::Path {
                path: tmp.path().join("nowhere").display().to_string(),
            }],
            Some(sha256_file(&staged).unwrap()),
        );
        let first = File::create(dir.join(".test.gguf.lock")).unwrap();
        first.lock().unwrap();
        let orphans = [
            dir.join("test.gguf.4242424.part"),
            dir.join(".test.gguf.pip-4242424"),
        ];
        std::fs::write(&orphans[0], b"half").unwrap();
        std::fs::create_dir(&orphans[1]).unwrap();
        let other = dir.join("other.gguf.4242424.part");
        std::fs::write(&other, b"another file's").unwrap();
        let (e2, dir2) = (e.clone(), dir.clone());
        let second = std::thread::spawn(move || pull(&e2, &dir2));
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!second.is_finished(), "the second pull did not wait");
        std::fs::rename(&staged, dir.join("test.gguf")).unwrap();
        drop(first);
        assert_eq!(second.join().unwrap().unwrap(), dir.join("test.gguf"));
        assert!(orphans.iter().all(|o| !o.exists()), "{orphans:?}");
        assert!(
            other.exists(),
            "another file's part is not this pull's to remove"
        );
    }

    /// A source that fails midway (a dropped connection; a full disk fails `write_all` or
    /// `sync_all` the same way): the error names the file and the partial data is removed.
    #[test]
    fn a_copy_failing_midway_removes_the_partial_file() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("No space left on device"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("m.gguf");
        let err = install_from_reader(Failing(3 << 20), None, &dest, None, "m")
            .unwrap_err()
            .to_string();
        assert!(err.contains("No space left on device"), "{err}");
        assert_eq!(leftovers(tmp.path()), Vec::<String>::new());
    }

    #[test]
    fn unreachable_hub_without_fallback_fails_fast_and_clearly() {
        let tmp = tempfile::tempdir().unwrap();
        let e = entry(
            vec![Source::Hf {
                repo: "nobody/nothing".into(),
                file: "x.gguf".into(),
                revision: "main".into(),
            }],
            None,
        );
        let started = std::time::Instant::now();
        // Port 9 on loopback: nothing listens, the connection is refused at once.
        let err = sources::fetch_hf_from(
            &e.sources[0],
            &tmp.path().join("x.gguf"),
            None,
            Some("http://127.0.0.1:9"),
        )
        .unwrap_err()
        .to_string();
        assert!(started.elapsed().as_secs() < 30);
        assert!(!err.is_empty());
        assert!(!tmp.path().join("x.gguf").exists());
    }
}
