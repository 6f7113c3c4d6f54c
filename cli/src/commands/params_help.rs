//! The backends' parameter descriptions in `kiln submit --help`.
//!
//! Each backend describes the parameters it takes (`kiln_protocol::params`); a
//! worker sends that description to the broker when it registers, and the broker
//! refuses at submit a `-P key=value` no worker would accept. The help shows the
//! descriptions of the backends as built (the sim's defaults, Wan2GP's ranges,
//! ComfyUI's built-in templates), from the same code the workers use; a fleet
//! whose operators changed settings or installed templates says what it takes in
//! `kiln workers --json` (`backends[].params`).

use kiln_config::SimConfig;
use kiln_protocol::params::ParamSchema;
use kiln_protocol::Backend;
use kiln_worker::backends::comfyui::{graph::Templates, schema as comfyui_schema};
use kiln_worker::backends::{sim::SimBackend, wan2gp::schema as wan2gp_schema};

/// The built-in description of each backend.
pub fn built_in() -> Vec<(Backend, ParamSchema)> {
    let mut all = vec![(Backend::Sim, SimBackend::new(SimConfig::default()).schema())];
    if let Ok(templates) = Templates::load(None) {
        all.push((Backend::Comfyui, comfyui_schema::schema(&templates)));
    }
    all.push((Backend::Wan2gp, wan2gp_schema::schema()));
    all
}

/// The text after `kiln submit --help`.
pub fn text() -> String {
    let mut text = String::from(
        "Backend parameters (`-P key=value`; --prompt, --seed, --width, --height and \
         --steps set the same names). The broker refuses, at submit, a parameter no \
         worker of the backend takes or a value out of its range. As built; a fleet's \
         own (operator settings, installed templates) are in `kiln workers --json` \
         (backends[].params).\n",
    );
    for (backend, schema) in built_in() {
        for set in &schema.sets {
            // ComfyUI describes each built-in template twice: by task and by name.
            if set.template.is_some()
                && schema
                    .sets
                    .iter()
                    .any(|s| s.template.is_none() && s.params == set.params)
            {
                continue;
            }
            text.push_str(&format!("\n{backend} ({}):\n", set.label()));
            text.push_str(&set.help("  "));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_and_every_parameter_it_uses_is_in_the_help() {
        let text = text();
        for (backend, schema) in built_in() {
            assert!(text.contains(&format!("\n{backend} (")), "{backend}");
            for p in schema.sets.iter().flat_map(|s| &s.params) {
                if !p.is_unused_common() {
                    assert!(
                        text.contains(&format!("  {}", p.name)) && text.contains(&p.summary()),
                        "{backend} {} missing",
                        p.name
                    );
                }
            }
        }
        // The sim's step time, with its unit and default, as the sim describes it.
        assert!(text.contains("step_ms"), "{text}");
        assert!(text.contains(" ms, default "), "{text}");
    }
}
