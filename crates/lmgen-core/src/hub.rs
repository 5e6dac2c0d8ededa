//! Resolving the `MODEL` argument to files on disk, offline: a directory, a `.gguf` file,
//! an alias from a models file, or a model id in the Hugging Face cache.
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelLocation {
    /// Hugging Face layout directory.
    Dir(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
}

impl ModelLocation {
    pub fn path(&self) -> &Path {
        match self {
            ModelLocation::Dir(p) | ModelLocation::Gguf(p) => p,
        }
    }
}

/// Resolution order: existing path → alias in the models file → HF cache id.
/// `models_file`: explicit `--models-file`, else `$LMGEN_MODELS`.
pub fn resolve(model: &str, models_file: Option<&Path>) -> Result<ModelLocation> {
    let p = Path::new(model);
    if p.exists() {
        return location_of(p);
    }
    let env_file = std::env::var_os("LMGEN_MODELS").map(PathBuf::from);
    let file = models_file.map(Path::to_path_buf).or(env_file);
    let mut tried = vec![format!("no file or directory '{model}'")];
    if let Some(file) = &file {
        if let Some(target) = lookup_alias(file, model)? {
            let t = if target.is_relative() {
                file.parent().unwrap_or(Path::new(".")).join(&target)
            } else {
                target
            };
            if !t.exists() {
                return Err(Error::ModelNotFound(format!(
                    "alias '{model}' in {} points to {}, which does not exist",
                    file.display(),
                    t.display()
                )));
            }
            return location_of(&t);
        }
        tried.push(format!("no alias '{model}' in {}", file.display()));
    }
    if model.contains('/') && !model.starts_with('.') && !model.starts_with('/') {
        let cache = hf_cache_dir();
        if let Some(dir) = snapshot_dir(&cache, model) {
            return Ok(ModelLocation::Dir(dir));
        }
        tried.push(format!("not in the Hugging Face cache {}", cache.display()));
    }
    Err(Error::ModelNotFound(format!(
        "{model} ({})",
        tried.join("; ")
    )))
}

fn location_of(p: &Path) -> Result<ModelLocation> {
    if p.is_dir() {
        Ok(ModelLocation::Dir(p.to_path_buf()))
    } else if p
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        Ok(ModelLocation::Gguf(p.to_path_buf()))
    } else {
        Err(Error::ModelNotFound(format!(
            "{}: expected a model directory (config.json + weights) or a .gguf file",
            p.display()
        )))
    }
}

/// The models file is TOML mapping alias → path, either at top level or under `[models]`.
/// Unquoted aliases with dots (`galactica-6.7b = "..."`) parse as nested TOML keys; they are
/// joined back with dots. An alias may also be a table with a `path` key.
fn lookup_alias(file: &Path, alias: &str) -> Result<Option<PathBuf>> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        Error::bad_config(file, e.to_string().lines().next().unwrap_or("").to_string())
    })?;
    let scope = match table.get("models") {
        Some(toml::Value::Table(t)) => t,
        _ => &table,
    };
    let mut aliases = Vec::new();
    flatten(scope, "", &mut aliases);
    Ok(aliases
        .into_iter()
        .find(|(k, _)| k == alias)
        .map(|(_, v)| PathBuf::from(v)))
}

fn flatten(t: &toml::Table, prefix: &str, out: &mut Vec<(String, String)>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::String(s) => out.push((key, s.clone())),
            toml::Value::Table(inner) => {
                if let Some(toml::Value::String(p)) = inner.get("path") {
                    out.push((key.clone(), p.clone()));
                }
                flatten(inner, &key, out);
            }
            _ => {}
        }
    }
}

/// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub` (as huggingface_hub).
pub fn hf_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    home.join("huggingface").join("hub")
}

/// `models--org--name/snapshots/<rev>` for the revision in `refs/main`, else the only
/// (or most recently modified) snapshot.
pub fn snapshot_dir(cache: &Path, model_id: &str) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", model_id.replace('/', "--")));
    let snaps = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let d = snaps.join(rev.trim());
        if d.is_dir() {
            return Some(d);
        }
    }
    let mut entries: Vec<_> = std::fs::read_dir(&snaps)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    entries.sort();
    entries.pop().map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_hf_cache_snapshot_from_refs_main() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--facebook--opt-125m");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/old")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        assert_eq!(
            snapshot_dir(tmp.path(), "facebook/opt-125m"),
            Some(repo.join("snapshots/abc123"))
        );
        assert_eq!(snapshot_dir(tmp.path(), "facebook/opt-350m"), None);
    }

    #[test]
    fn aliases_from_models_file() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("gal")).unwrap();
        let f = tmp.path().join("models.toml");
        std::fs::write(
            &f,
            "[models]\ngalactica-6.7b = \"gal\"\n\"opt-30b\" = { path = \"gal\" }\nbroken = \"nope\"\n",
        )
        .unwrap();
        assert_eq!(
            resolve("galactica-6.7b", Some(&f)).unwrap(),
            ModelLocation::Dir(tmp.path().join("gal"))
        );
        assert_eq!(
            resolve("opt-30b", Some(&f)).unwrap(),
            ModelLocation::Dir(tmp.path().join("gal"))
        );
        let e = resolve("broken", Some(&f)).unwrap_err().to_string();
        assert!(
            e.contains("alias 'broken'") && e.contains("does not exist"),
            "{e}"
        );
        let e = resolve("unknown-model", Some(&f)).unwrap_err().to_string();
        assert!(e.contains("no alias 'unknown-model'"), "{e}");
    }
}
