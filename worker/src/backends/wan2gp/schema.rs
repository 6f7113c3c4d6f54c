//! The Wan2GP backend's parameter description ([`ParamSchema`]): the Kiln names
//! that [`super::params::plan`] maps to Wan2GP settings, with the ranges it
//! enforces, so the broker refuses a bad value or an unknown key at submit. What
//! only the model knows (its frame grid, its VRAM row, its LoRAs) is still checked
//! when the job runs.

use kiln_protocol::params::{ParamKind, ParamSchema, ParamSet, ParamSpec};
use kiln_protocol::Task;

/// The description; the same for every Wan2GP worker.
pub fn schema() -> ParamSchema {
    use ParamKind::*;
    let p = ParamSpec::new;
    let side = |name| {
        p(
            name,
            Integer,
            "frame side; rounded down to a multiple of 16",
        )
        .range(16.0, 8192.0)
        .unit("px")
    };
    let params = vec![
        p("prompt", String, "required for text tasks"),
        p("negative_prompt", String, ""),
        side("width"),
        side("height"),
        p("resolution", String, "WIDTHxHEIGHT, e.g. 832x480 (instead of width and height)"),
        p("frames", Integer, "video length; snapped to the model's frame grid")
            .range(1.0, 10_000.0)
            .unit("frames"),
        p("seconds", Number, "video length in seconds (instead of frames)")
            .range(0.05, 600.0)
            .unit("s"),
        p("fps", Number, "video frame rate; default: the model's")
            .range(1.0, 120.0)
            .unit("fps"),
        p("steps", Integer, "inference steps; default: the model's").range(1.0, 1000.0),
        p("seed", Integer, "default: drawn by the worker and reported")
            .range(0.0, u32::MAX as f64),
        p("guidance", Number, "guidance_scale").range(0.0, 100.0),
        p("guidance2", Number, "guidance2_scale").range(0.0, 100.0),
        p("flow_shift", Number, "flow_shift").range(0.0, 100.0),
        p("sampler", String, "sample_solver"),
        p("count", Integer, "images per job (text_to_image)").range(1.0, 8.0),
        p(
            "wan2gp",
            Object,
            "raw Wan2GP settings merged as they are (no paths or URLs; not the settings Kiln manages)",
        ),
    ];
    ParamSchema {
        sets: vec![ParamSet {
            tasks: vec![Task::TextToVideo, Task::ImageToVideo, Task::TextToImage],
            params,
            ..ParamSet::default()
        }
        .with_common()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::{Backend, JobSpec};

    #[test]
    fn kiln_names_and_ranges_are_enforced() {
        let t2v = || JobSpec::new(Backend::Wan2gp, Task::TextToVideo).param("prompt", "waves");
        let field = |s: JobSpec| schema().check(&s).err().and_then(|e| e.to_body().field);
        assert_eq!(
            field(t2v().param("seconds", 5).param("resolution", "832x480")),
            None
        );
        for (spec, at) in [
            (t2v().param("seed", -1), "job.params.seed"),
            (t2v().param("steps", 0), "job.params.steps"),
            (t2v().param("seconds", 900), "job.params.seconds"),
            (t2v().param("wan2gp", "x"), "job.params.wan2gp"),
            (t2v().param("guidanse", 5), "job.params.guidanse"),
        ] {
            assert_eq!(field(spec).as_deref(), Some(at));
        }
    }
}
