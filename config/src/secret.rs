//! Tokens: read from the config, the environment, a file, or a systemd credential,
//! and never printed.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ConfigError;

/// A secret string. `Debug` and `Display` print `<redacted>`; figment may hand a
/// numeric-looking token over as a number, which is accepted as its text.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl schemars::JsonSchema for Secret {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Secret".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "writeOnly": true })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Int(i64),
            Uint(u64),
        }
        Ok(Secret(match Raw::deserialize(d)? {
            Raw::Text(s) => s,
            Raw::Int(i) => i.to_string(),
            Raw::Uint(u) => u.to_string(),
        }))
    }
}

/// Resolves a token given inline, by file, or as a systemd credential named
/// `credential` (in `$CREDENTIALS_DIRECTORY`, set by `LoadCredential=`). Inline wins,
/// then the file, then the credential. Surrounding whitespace in files is trimmed.
pub fn resolve(
    key: &str,
    inline: &Option<Secret>,
    file: &Option<PathBuf>,
    credential: &str,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(s) = inline {
        return non_empty(key, s.clone()).map(Some);
    }
    if let Some(path) = file {
        // Errors name the key the operator wrote: `broker.client_token_file`.
        return read(&format!("{key}_file"), path).map(Some);
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let path = Path::new(&dir).join(credential);
        if path.exists() {
            return read(&format!("{key} (systemd credential {credential})"), &path).map(Some);
        }
    }
    Ok(None)
}

fn read(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        key: key.to_string(),
        message: format!("cannot read token file {}: {e}", path.display()),
    })?;
    non_empty(key, Secret(text.trim().to_string()))
}

fn non_empty(key: &str, s: Secret) -> Result<Secret, ConfigError> {
    if s.0.is_empty() {
        Err(ConfigError::Invalid {
            key: key.to_string(),
            message: "token is empty".into(),
        })
    } else {
        Ok(s)
    }
}
