//! `[worker.wan2gp]`: where Wan2GP is installed, how its bridge is supervised, and
//! the VRAM table that picks memory profile, resolution and frame limits.
//!
//! The table lives here, not in the worker, because it is configuration: the worker
//! uses it for defaults and to refuse what no GPU could run, and `kiln gpu-info`
//! prints it. There is one table; editing it changes both.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// The Wan2GP backend of one worker.
///
/// The worker runs a small Python bridge (embedded in the worker binary) with
/// Wan2GP's own Python; the bridge keeps Wan2GP's in-process session (and so the
/// loaded model) alive between jobs. Times are in seconds (fractions allowed).
/// Kiln uses WanGP (Wan2GP) by DeepBeepMeep under the WanGP Community License:
/// paid, hosted or third-party access needs a separate licence from its author
/// (see the README).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Wan2gpConfig {
    /// The Wan2GP checkout: the folder holding `wgp.py` and `shared/api.py`.
    /// Required when `worker.backends` lists `wan2gp`.
    #[schemars(example = &"/opt/Wan2GP")]
    pub root: Option<PathBuf>,
    /// The Python of Wan2GP's own environment.
    #[schemars(example = &"/opt/Wan2GP/venv/bin/python")]
    pub python: PathBuf,
    /// Extra Wan2GP command-line flags. A `--profile` here wins over the VRAM table.
    #[schemars(example = ["--attention", "sdpa", "--perc-reserved-mem-max", "0.4"])]
    pub args: Vec<String>,
    /// This worker's Wan2GP config folder (holds its own `wgp_config.json`).
    /// Default: `<worker.work_dir>/wan2gp/config`.
    #[schemars(example = &"/var/lib/kiln/gpu0/wan2gp-config")]
    pub config_dir: Option<PathBuf>,
    /// Where Wan2GP writes this worker's outputs before they are uploaded.
    /// Default: `<worker.work_dir>/wan2gp/outputs`.
    #[schemars(example = &"/var/lib/kiln/gpu0/wan2gp-outputs")]
    pub output_dir: Option<PathBuf>,
    /// Extra environment for the bridge, e.g. `HF_HUB_OFFLINE = "1"` once the
    /// weights are downloaded, so nothing reaches out to Hugging Face.
    #[schemars(example = serde_json::json!({ "HF_HUB_OFFLINE": "1" }))]
    pub env: BTreeMap<String, String>,
    /// Pin the bridge to this worker's GPU with `CUDA_VISIBLE_DEVICES` (the GPU's
    /// UUID when NVML knows it, else its index) and `CUDA_DEVICE_ORDER=PCI_BUS_ID`.
    pub pin_gpu: bool,
    /// Model types used when a job names none.
    pub default_models: DefaultModels,
    /// A model type to load with a one-step generation as soon as the bridge is
    /// up, so the first real job finds it warm.
    #[schemars(example = &"t2v_2_2")]
    pub warmup_model: Option<String>,
    /// Offer (and accept jobs for) model types whose weights are not downloaded
    /// yet. Off by default: Wan2GP has no lock between processes for downloads,
    /// so pre-download the weights instead.
    pub download_missing: bool,
    /// Longest wait for the bridge's `ready` (Wan2GP's start-up, plus any
    /// download of the weights on first use).
    pub ready_timeout_s: f64,
    /// How often the bridge reports that it is alive.
    pub heartbeat_s: f64,
    /// No heartbeat for this long: the bridge is wedged and is killed.
    pub heartbeat_timeout_s: f64,
    /// No progress, status or info from a running job for this long: it has
    /// stalled and the bridge is killed (VAE decoding of long videos is slow).
    pub stall_timeout_s: f64,
    /// After asking Wan2GP to cancel, how long to wait for it to stop (model loads
    /// and VAE decoding cannot be interrupted) before SIGTERM.
    pub cancel_grace_s: f64,
    /// After SIGTERM, how long to wait before SIGKILL of the bridge's process group.
    pub kill_grace_s: f64,
    /// Progress reports from the bridge are coalesced to at most one per this
    /// interval (a phase change and the last step always pass).
    pub progress_interval_s: f64,
    /// Restart the bridge after this many jobs (0: never).
    pub recycle_after_jobs: u32,
    /// Restart the bridge, when idle, once its resident memory exceeds this many
    /// MiB (0: never). Wan2GP's pinned RAM can grow over time.
    pub recycle_rss_mb: u64,
    /// VRAM → memory profile, largest resolution and frame count.
    pub vram_table: VramTable,
}

impl Default for Wan2gpConfig {
    fn default() -> Self {
        Wan2gpConfig {
            root: None,
            python: PathBuf::from("python3"),
            args: Vec::new(),
            config_dir: None,
            output_dir: None,
            env: BTreeMap::new(),
            pin_gpu: true,
            default_models: DefaultModels::default(),
            warmup_model: None,
            download_missing: false,
            ready_timeout_s: 600.0,
            heartbeat_s: 5.0,
            heartbeat_timeout_s: 30.0,
            stall_timeout_s: 900.0,
            cancel_grace_s: 90.0,
            kill_grace_s: 10.0,
            progress_interval_s: 0.5,
            recycle_after_jobs: 0,
            recycle_rss_mb: 0,
            vram_table: VramTable::default(),
        }
    }
}

/// The Wan2GP model type used for each task when a job does not name one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DefaultModels {
    /// Model type of `text_to_video` jobs.
    pub text_to_video: String,
    /// Model type of `image_to_video` jobs.
    pub image_to_video: String,
    /// Model type of `text_to_image` jobs.
    pub text_to_image: String,
}

impl Default for DefaultModels {
    fn default() -> Self {
        DefaultModels {
            text_to_video: "t2v_2_2".into(),
            image_to_video: "i2v_2_2".into(),
            text_to_image: "flux".into(),
        }
    }
}

/// The memory profiles Wan2GP's `--profile` accepts (there is no profile 0).
pub const WAN2GP_PROFILES: [f64; 7] = [1.0, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0];

/// One row of the VRAM table: what a GPU with at least `min_vram_mb` runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VramRow {
    /// The smallest GPU (MiB, nominal: a "24 GB" card that reports 6% less still
    /// qualifies) this row is for.
    pub min_vram_mb: u64,
    /// Wan2GP memory profile: 1, 2, 3, 3.5, 4, 4.5 or 5.
    pub profile: f64,
    /// Largest video frame, `WIDTHxHEIGHT`; a portrait request of the same area
    /// fits too.
    pub max_resolution: String,
    /// Most frames of one video.
    pub max_frames: u32,
}

impl VramRow {
    /// `max_resolution` as (width, height). Checked by [`VramTable::validate`].
    pub fn max_size(&self) -> (u32, u32) {
        parse_resolution(&self.max_resolution).unwrap_or((0, 0))
    }

    /// The largest frame area in pixels.
    pub fn max_pixels(&self) -> u64 {
        let (w, h) = self.max_size();
        w as u64 * h as u64
    }

    /// The profile as Wan2GP's command line spells it (`3`, `3.5`).
    pub fn profile_arg(&self) -> String {
        format!("{}", self.profile)
    }
}

/// Parses `WIDTHxHEIGHT` (e.g. `1280x720`).
pub fn parse_resolution(text: &str) -> Option<(u32, u32)> {
    let (w, h) = text.trim().split_once(['x', 'X'])?;
    let (w, h) = (w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?);
    (w > 0 && h > 0).then_some((w, h))
}

/// The VRAM table, largest GPUs first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct VramTable(pub Vec<VramRow>);

impl Default for VramTable {
    /// 24 GB → 1920x1080/169 frames, 16 GB → 1280x720/121, 12 GB → 1280x720/97,
    /// 8 GB → 720x480/73, 6 GB → 512x512/49. Profile 3 keeps the whole model in
    /// VRAM on 24 GB cards; 4 streams blocks in as needed (Wan2GP's recommended
    /// default); 4.5 saves about another GiB; 5 is the fail-safe.
    fn default() -> Self {
        let row = |gb: u64, profile: f64, res: &str, frames: u32| VramRow {
            min_vram_mb: gb * 1024,
            profile,
            max_resolution: res.into(),
            max_frames: frames,
        };
        VramTable(vec![
            row(24, 3.0, "1920x1080", 169),
            row(16, 4.0, "1280x720", 121),
            row(12, 4.0, "1280x720", 97),
            row(8, 4.5, "720x480", 73),
            row(6, 5.0, "512x512", 49),
        ])
    }
}

impl VramTable {
    pub fn rows(&self) -> &[VramRow] {
        &self.0
    }

    /// The index of the first (largest) row a GPU with this much memory qualifies
    /// for. Cards are sold as "24 GB" but report slightly less, so 6% slack.
    pub fn row_index_for(&self, total_vram_mb: u64) -> Option<usize> {
        self.0
            .iter()
            .position(|r| total_vram_mb.saturating_mul(100) >= r.min_vram_mb.saturating_mul(94))
    }

    /// The row a GPU with this much memory qualifies for.
    pub fn row_for(&self, total_vram_mb: u64) -> Option<&VramRow> {
        self.row_index_for(total_vram_mb).map(|i| &self.0[i])
    }

    /// Checks every row and that rows go from the largest GPU to the smallest.
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let bad = |message: String| ConfigError::Invalid {
            key: key.into(),
            message,
        };
        if self.0.is_empty() {
            return Err(bad("needs at least one row".into()));
        }
        for (i, r) in self.0.iter().enumerate() {
            if !WAN2GP_PROFILES.contains(&r.profile) {
                return Err(bad(format!(
                    "row {i}: profile {} does not exist in Wan2GP; use 1, 2, 3, 3.5, 4, 4.5 or 5",
                    r.profile
                )));
            }
            if parse_resolution(&r.max_resolution).is_none() {
                return Err(bad(format!(
                    "row {i}: max_resolution {:?} is not WIDTHxHEIGHT",
                    r.max_resolution
                )));
            }
            if r.max_frames == 0 {
                return Err(bad(format!("row {i}: max_frames must be at least 1")));
            }
            if i > 0 && r.min_vram_mb >= self.0[i - 1].min_vram_mb {
                return Err(bad(format!(
                    "row {i}: rows must go from the largest min_vram_mb to the smallest"
                )));
            }
        }
        Ok(())
    }
}

impl Wan2gpConfig {
    /// Checks ranges serde cannot; `kiln config check` reports these.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value, min) in [
            ("worker.wan2gp.ready_timeout_s", self.ready_timeout_s, 0.1),
            ("worker.wan2gp.heartbeat_s", self.heartbeat_s, 0.05),
            (
                "worker.wan2gp.heartbeat_timeout_s",
                self.heartbeat_timeout_s,
                0.1,
            ),
            ("worker.wan2gp.stall_timeout_s", self.stall_timeout_s, 0.1),
            ("worker.wan2gp.cancel_grace_s", self.cancel_grace_s, 0.0),
            ("worker.wan2gp.kill_grace_s", self.kill_grace_s, 0.0),
            (
                "worker.wan2gp.progress_interval_s",
                self.progress_interval_s,
                0.0,
            ),
        ] {
            if !(value.is_finite() && value >= min && value <= 7.0 * 24.0 * 3600.0) {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    message: format!(
                        "must be a number of seconds from {min} to one week, got {value}"
                    ),
                });
            }
        }
        if self.heartbeat_timeout_s <= self.heartbeat_s {
            return Err(ConfigError::Invalid {
                key: "worker.wan2gp.heartbeat_timeout_s".into(),
                message: "must be longer than worker.wan2gp.heartbeat_s".into(),
            });
        }
        self.vram_table.validate("worker.wan2gp.vram_table")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_is_valid_and_uses_real_profiles() {
        let t = VramTable::default();
        t.validate("t").unwrap();
        assert_eq!(
            t.row_for(24_564).unwrap().max_frames,
            169,
            "a 24 GB card reports a little less"
        );
        assert_eq!(t.row_for(16_376).unwrap().max_resolution, "1280x720");
        assert_eq!(t.row_for(12_288).unwrap().max_frames, 97);
        assert_eq!(t.row_for(8_192).unwrap().max_frames, 73);
        assert_eq!(
            t.row_for(81_920).unwrap().profile,
            3.0,
            "bigger cards use the top row"
        );
        assert!(t.row_for(4_096).is_none());
        assert_eq!(t.row_for(8_192).unwrap().profile_arg(), "4.5");
        assert_eq!(t.rows()[0].profile_arg(), "3");
    }

    #[test]
    fn bad_rows_name_the_problem() {
        let mut t = VramTable::default();
        t.0[1].profile = 0.0;
        assert!(t
            .validate("k")
            .unwrap_err()
            .to_string()
            .contains("profile 0"));
        let mut t = VramTable::default();
        t.0[2].max_resolution = "big".into();
        assert!(t
            .validate("k")
            .unwrap_err()
            .to_string()
            .contains("WIDTHxHEIGHT"));
        let mut t = VramTable::default();
        t.0.swap(0, 1);
        assert!(t.validate("k").unwrap_err().to_string().contains("largest"));
        let c = Wan2gpConfig {
            heartbeat_timeout_s: 1.0,
            heartbeat_s: 5.0,
            ..Wan2gpConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("heartbeat_timeout_s"));
    }

    #[test]
    fn resolutions_parse() {
        assert_eq!(parse_resolution("1280x720"), Some((1280, 720)));
        assert_eq!(parse_resolution(" 832X480 "), Some((832, 480)));
        assert_eq!(parse_resolution("0x5"), None);
        assert_eq!(parse_resolution("1280"), None);
    }
}

#[cfg(test)]
mod example {
    use crate::KilnConfig;

    /// The documented example in `config/kiln.example.toml` must load as written.
    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment::Error
    fn the_example_wan2gp_block_loads() {
        // Inside a Jail: other tests set KILN_* variables process-wide meanwhile.
        figment::Jail::expect_with(|_| {
            check_example();
            Ok(())
        });
    }

    fn check_example() {
        // The example file shows the defaults; the Wan2GP examples are comments.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kiln.example.toml");
        let cfg = KilnConfig::load(std::slice::from_ref(&path)).unwrap();
        let w = &cfg.worker.wan2gp;
        assert_eq!(*w, crate::Wan2gpConfig::default());
        assert_eq!(
            w.vram_table,
            super::VramTable::default(),
            "the example shows the default table"
        );
        assert_eq!(w.ready_timeout_s, 600.0);
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains("# root = \"/opt/Wan2GP\""), "{text}");
        assert!(text.contains("HF_HUB_OFFLINE"), "{text}");
    }
}
