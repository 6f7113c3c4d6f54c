//! Configuration errors that say where a value came from (a file, an exact
//! environment variable, the default) and what was probably meant.

use std::path::PathBuf;

use figment::{Figment, Provider, Source};

use crate::{default_files, ConfigError, KilnConfig, TABLES};

/// Where the value of `key` (dotted) came from, for messages: `file kiln.toml`,
/// `environment variable KILN_CLIENT__BROKER` or `the built-in default`.
pub fn origin(figment: &Figment, key: &str) -> String {
    match figment.find_metadata(key) {
        Some(m) => describe_source(m, key),
        None => "the built-in default".into(),
    }
}

/// [`origin`] for the files a command line names (or the default files).
pub fn origin_for_command_line(files: &[PathBuf], key: &str) -> String {
    let files = if files.is_empty() {
        default_files()
    } else {
        files.to_vec()
    };
    KilnConfig::figment(&files)
        .map(|f| origin(&f, key))
        .unwrap_or_else(|_| "the configuration".into())
}

pub(crate) fn describe_source(m: &figment::Metadata, key: &str) -> String {
    if m.name.contains("environment") {
        return format!(
            "environment variable KILN_{}",
            key.replace('.', "__").to_ascii_uppercase()
        );
    }
    match &m.source {
        Some(Source::File(path)) => format!("file {}", path.display()),
        _ => "the built-in default".into(),
    }
}

/// Adds where the offending value came from to a validation error.
pub(crate) fn with_origin(err: ConfigError, figment: &Figment) -> ConfigError {
    match err {
        ConfigError::Invalid { key, message } => {
            // `worker.comfyui.args[2]`-style keys: look up the key itself.
            let base = key.split(['[', ' ']).next().unwrap_or(&key);
            let message = format!("{message} [from {}]", origin(figment, base));
            ConfigError::Invalid { key, message }
        }
        other => other,
    }
}

/// Reports top-level keys that are not a table of the schema, with a suggestion.
pub(crate) fn check_top_level(figment: &Figment) -> Result<(), ConfigError> {
    let data = figment
        .data()
        .map_err(|e| ConfigError::Parse(describe_lines(e, "")))?;
    let mut errors = Vec::new();
    for dict in data.values() {
        for key in dict.keys().filter(|k| !TABLES.contains(&k.as_str())) {
            let from = origin(figment, key);
            errors.push(format!(
                "  unknown table `{key}`{} [from {from}]",
                did_you_mean(key, &TABLES)
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Parse(errors))
    }
}

/// `; did you mean `heartbeat_ms`?` when one of `known` is close to `found`.
fn did_you_mean(found: &str, known: &[&str]) -> String {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(found, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| format!("; did you mean `{k}`?"))
        .unwrap_or_default()
}

/// Turns figment's errors into one line per key, each naming the value's source
/// (the file, or the exact environment variable). `table` is the table that was
/// extracted, prefixed to the error's path.
pub(crate) fn describe_lines(err: figment::Error, table: &str) -> Vec<String> {
    err.into_iter()
        .map(|e| {
            // figment's `extract_inner` appends the table to the end of the path.
            let mut rest = e.path.clone();
            if !table.is_empty() && rest.last().map(String::as_str) == Some(table) {
                rest.pop();
            }
            let mut path: Vec<String> = Vec::new();
            if !table.is_empty() && rest.first().map(String::as_str) != Some(table) {
                path.push(table.to_string());
            }
            path.extend(rest);
            let (kind, key) = match &e.kind {
                figment::error::Kind::UnknownField(found, expected) => {
                    let mut key = path.clone();
                    if key.last() != Some(found) {
                        key.push(found.clone());
                    }
                    (
                        format!("unknown key{}", did_you_mean(found, expected)),
                        key.join("."),
                    )
                }
                kind => (kind.to_string(), path.join(".")),
            };
            let source = e
                .metadata
                .as_ref()
                .map(|m| describe_source(m, &key))
                .unwrap_or_else(|| "the built-in default".into());
            if key.is_empty() {
                format!("  {kind} [from {source}]")
            } else {
                format!("  `{key}`: {kind} [from {source}]")
            }
        })
        .collect()
}
