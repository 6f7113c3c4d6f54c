//! The gateway's file access, fenced to the configured allowed roots.
//!
//! An assistant names paths; a path is only used after it was resolved to a real
//! location inside one of the roots: `..` is refused outright, directories are
//! canonicalised after creation (so a symlink cannot lead outside), and file names
//! must be plain names. `save_output` writes through here, and can keep a JSON asset
//! manifest beside a game's assets (see [`Manifest`]).

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{io_error, ToolError};

/// The directories the gateway may read from and write into.
#[derive(Debug, Clone, Default)]
pub struct AllowedRoots {
    roots: Vec<PathBuf>,
}

impl AllowedRoots {
    /// Canonicalises the configured roots; roots that do not exist are created.
    pub fn new(configured: &[PathBuf]) -> std::io::Result<AllowedRoots> {
        let mut roots = Vec::new();
        for root in configured {
            std::fs::create_dir_all(root)?;
            roots.push(root.canonicalize()?);
        }
        Ok(AllowedRoots { roots })
    }

    fn root_of(&self, path: &Path) -> Option<&Path> {
        self.roots
            .iter()
            .map(PathBuf::as_path)
            .find(|r| path.starts_with(r))
    }

    fn none_configured(field: &str) -> ToolError {
        ToolError::denied(
            field,
            "the gateway has no allowed roots configured (mcp.allowed_roots)",
        )
    }

    /// Refuses `..` and other non-plain components in a caller's path.
    fn lexical_check(field: &str, path: &Path) -> Result<(), ToolError> {
        for c in path.components() {
            match c {
                Component::ParentDir => {
                    return Err(ToolError::denied(field, "`..` is not allowed in paths"))
                }
                Component::Prefix(_) => {
                    return Err(ToolError::denied(field, "drive prefixes are not allowed"))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Resolves a directory to write into, creating it, and returns it with the
    /// root it lies in.
    pub fn writable_dir(&self, field: &str, dir: &str) -> Result<(PathBuf, PathBuf), ToolError> {
        let target = self.target_dir(field, dir)?;
        self.create_dir(field, &target.0)
    }

    /// Checks a directory to write into without creating anything: returns the
    /// path it will have and the root it lies in. [`Self::create_dir`] makes it
    /// once the rest of the call has been checked, so a refused call leaves no
    /// empty directories behind.
    pub fn target_dir(&self, field: &str, dir: &str) -> Result<(PathBuf, PathBuf), ToolError> {
        let first = self
            .roots
            .first()
            .ok_or_else(|| Self::none_configured(field))?;
        let given = Path::new(dir);
        Self::lexical_check(field, given)?;
        let candidate = if given.is_absolute() {
            given.to_path_buf()
        } else {
            first.join(given)
        };
        let existing =
            nearest_existing(&candidate).ok_or_else(|| self.outside(field, &candidate))?;
        let root = self
            .root_of(&existing)
            .ok_or_else(|| self.outside(field, &candidate))?
            .to_path_buf();
        Ok((candidate, root))
    }

    /// Creates a directory checked by [`Self::target_dir`] and checks its real
    /// path again (a symlink may lead out of the roots).
    pub fn create_dir(
        &self,
        field: &str,
        candidate: &Path,
    ) -> Result<(PathBuf, PathBuf), ToolError> {
        std::fs::create_dir_all(candidate).map_err(|e| io_error("creating the directory", e))?;
        let real = candidate
            .canonicalize()
            .map_err(|e| io_error("resolving the directory", e))?;
        let root = self
            .root_of(&real)
            .ok_or_else(|| self.outside(field, candidate))?
            .to_path_buf();
        Ok((real, root))
    }

    fn outside(&self, field: &str, candidate: &Path) -> ToolError {
        ToolError::denied(
            field,
            format!(
                "{} is outside the allowed roots ({})",
                candidate.display(),
                self.describe()
            ),
        )
    }

    /// Resolves an existing file to read.
    pub fn readable_file(&self, field: &str, path: &str) -> Result<PathBuf, ToolError> {
        if self.roots.is_empty() {
            return Err(Self::none_configured(field));
        }
        let given = Path::new(path);
        Self::lexical_check(field, given)?;
        let candidate = if given.is_absolute() {
            given.to_path_buf()
        } else {
            self.roots[0].join(given)
        };
        let real = candidate.canonicalize().map_err(|e| {
            ToolError::invalid(field, format!("cannot open {}: {e}", candidate.display()))
        })?;
        if self.root_of(&real).is_none() {
            return Err(ToolError::denied(
                field,
                format!(
                    "{} is outside the allowed roots ({})",
                    real.display(),
                    self.describe()
                ),
            ));
        }
        Ok(real)
    }

    fn describe(&self) -> String {
        self.roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The deepest ancestor of `path` (or itself) that exists, canonicalised.
fn nearest_existing(path: &Path) -> Option<PathBuf> {
    path.ancestors().find_map(|a| a.canonicalize().ok())
}

/// Writes `data` to `path` through a temporary file and a rename, so a reader never
/// sees half a file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ToolError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = path.with_file_name(format!(".{name}.kiln-tmp"));
    std::fs::write(&tmp, data).map_err(|e| io_error(&format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error(&format!("renaming to {}", path.display()), e))
}

/// One asset in a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Relative to the assets root, with `/` separators: what Bevy's
    /// `AssetServer::load` takes.
    pub path: String,
    pub media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    pub job: String,
    pub artifact: String,
    pub sha256: String,
    /// The seed that made this asset (see [`crate::save::output_seed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The asset is item `batch_index` of a batch drawn from `seed` as a whole
    /// (ComfyUI's `batch_size`): run alone with `seed`, it would not come out
    /// the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_index: Option<u16>,
}

/// A JSON asset manifest in the layout a Bevy game loads (for instance with
/// `bevy_common_assets`' JSON loader into a `HashMap<String, Entry>`): one map
/// `assets` from a key to the asset's path under the `assets/` folder and its
/// facts. Unknown top-level keys written by other tools are kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default)]
    pub assets: std::collections::BTreeMap<String, ManifestEntry>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Manifest {
    /// Resolves the manifest path inside `root`.
    pub fn path_in(root: &Path, field: &str, name: &str) -> Result<PathBuf, ToolError> {
        let rel = Path::new(name);
        if rel.is_absolute() {
            return Err(ToolError::denied(
                field,
                "give the manifest relative to the assets root",
            ));
        }
        AllowedRoots::lexical_check(field, rel)?;
        if rel.extension().and_then(|e| e.to_str()) != Some("json") {
            return Err(ToolError::invalid(field, "must be a .json file"));
        }
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| io_error("creating the manifest directory", e))?;
            let real = parent
                .canonicalize()
                .map_err(|e| io_error("resolving the manifest directory", e))?;
            if !real.starts_with(root) {
                return Err(ToolError::denied(
                    field,
                    "the manifest must stay inside the assets root",
                ));
            }
        }
        Ok(path)
    }

    pub fn load(path: &Path) -> Result<Manifest, ToolError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ToolError::Io(format!(
                    "{} is not a Kiln asset manifest: {e}",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(e) => Err(io_error(&format!("reading {}", path.display()), e)),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), ToolError> {
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| ToolError::Io(e.to_string()))?;
        text.push(b'\n');
        write_atomic(path, &text)
    }
}

/// `path` relative to `root`, with `/` separators.
pub fn asset_path(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .filter_map(|c| c.as_os_str().to_str())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_roots() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("assets");
        let roots = AllowedRoots::new(std::slice::from_ref(&root)).unwrap();
        let (dir, r) = roots.writable_dir("directory", "sprites/heroes").unwrap();
        assert!(dir.ends_with("assets/sprites/heroes") && dir.is_dir());
        assert_eq!(r, root.canonicalize().unwrap());
        assert_eq!(asset_path(&r, &dir.join("a.png")), "sprites/heroes/a.png");

        for bad in ["../escape", "/etc", "sprites/../../x"] {
            let err = roots.writable_dir("directory", bad).unwrap_err();
            assert!(
                matches!(&err, ToolError::AccessDenied { field, .. } if field == "directory"),
                "{bad}: {err}"
            );
        }
        assert!(!tmp.path().join("escape").exists());

        // A symlink inside the root that points outside is refused on its real path.
        std::os::unix::fs::symlink(tmp.path(), root.join("link")).unwrap();
        assert!(roots.writable_dir("directory", "link/inner").is_err());
        std::fs::write(tmp.path().join("secret.png"), b"x").unwrap();
        assert!(roots
            .readable_file("image.path", "link/secret.png")
            .is_err());

        let none = AllowedRoots::default();
        assert!(none.writable_dir("directory", "x").is_err());
    }

    #[test]
    fn manifests_keep_foreign_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let path = Manifest::path_in(tmp.path(), "manifest", "game.assets.json").unwrap();
        std::fs::write(&path, r#"{"version": 2, "assets": {}}"#).unwrap();
        let mut m = Manifest::load(&path).unwrap();
        m.assets.insert(
            "hero".into(),
            ManifestEntry {
                path: "sprites/hero.png".into(),
                media_type: "image/png".into(),
                width: Some(64),
                height: Some(64),
                job: "j1".into(),
                artifact: "j1.0".into(),
                sha256: "00".into(),
                seed: Some(3),
                batch_index: None,
            },
        );
        m.save(&path).unwrap();
        let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["version"], 2);
        assert_eq!(v["assets"]["hero"]["path"], "sprites/hero.png");
        assert!(Manifest::path_in(tmp.path(), "manifest", "../m.json").is_err());
        assert!(Manifest::path_in(tmp.path(), "manifest", "m.txt").is_err());
    }
}
