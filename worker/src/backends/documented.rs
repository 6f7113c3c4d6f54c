//! docs/protocol.md lists, per backend, the parameter names a job may use
//! beyond the common ones. Those lists are written by hand; this test keeps
//! them in step with the descriptions the workers send (and the broker
//! enforces), so a parameter added to a backend is added to the doc too.

use std::collections::BTreeSet;

use kiln_protocol::params::{ParamSchema, COMMON_PARAMS, UNUSED_COMMON};

use super::comfyui::graph::Templates;
use super::sim::SimBackend;

/// The names a schema describes that are not common ones, nor common ones the
/// backend ignores.
fn own_names(schema: &ParamSchema) -> BTreeSet<String> {
    schema
        .sets
        .iter()
        .flat_map(|set| &set.params)
        .filter(|p| p.description != UNUSED_COMMON && !COMMON_PARAMS.contains(&p.name.as_str()))
        .map(|p| p.name.clone())
        .collect()
}

/// The text of the doc's bullet for `backend` ("- `sim`: ..." up to the next
/// bullet or blank line).
fn bullet(doc: &str, backend: &str) -> String {
    let start = format!("- `{backend}`:");
    let mut lines = doc.lines().skip_while(|l| !l.starts_with(&start));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("docs/protocol.md has no bullet {start}"));
    let rest = lines.take_while(|l| !l.trim().is_empty() && !l.starts_with("- `"));
    std::iter::once(first)
        .chain(rest)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn the_protocol_doc_names_every_parameter_each_backend_describes() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .expect("docs/protocol.md");
    let sim = SimBackend::new(kiln_config::SimConfig {
        allow_faults: true,
        ..kiln_config::SimConfig::default()
    });
    let templates = Templates::load(None).expect("built-in templates");
    for (backend, schema) in [
        ("sim", sim.schema()),
        ("comfyui", super::comfyui::schema::schema(&templates)),
        ("wan2gp", super::wan2gp::schema::schema()),
    ] {
        let text = bullet(&doc, backend);
        let names = own_names(&schema);
        assert!(
            !names.is_empty(),
            "{backend} describes no parameter of its own"
        );
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !text.contains(&format!("`{n}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/protocol.md's `{backend}` bullet does not name {missing:?}: {text}"
        );
    }
}
