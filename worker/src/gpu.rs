//! What GPU this worker drives, read through NVML behind a trait.
//!
//! The [`GpuSource`] trait is the seam: [`NvmlSource`] talks to the driver, tests
//! substitute their own. [`GpuProbe`] turns readings plus the worker's config into
//! the [`GpuInfo`] the broker schedules on, including the two awkward cases:
//!
//! - no NVIDIA library: use the GPU declared in the config, or, for a worker that
//!   only runs the `sim` backend, a simulated one; otherwise refuse to start;
//! - unified memory (DGX Spark GB10, Jetson): NVML answers *Not Supported* for
//!   memory, so total/free come from `/proc/meminfo` and the GPU is reported as
//!   unified. Never 0 VRAM.

use std::path::Path;

use kiln_config::GpuConfig;
use kiln_protocol::worker::{GpuInfo, GpuSource as Source};

const MIB: u64 = 1024 * 1024;

/// Why memory figures are missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryReading {
    Known {
        total_bytes: u64,
        free_bytes: u64,
    },
    /// NVML_ERROR_NOT_SUPPORTED: memory is shared with the CPU.
    NotSupported,
    Failed(String),
}

/// One device as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReading {
    pub name: String,
    pub uuid: String,
    pub memory: MemoryReading,
    pub utilization_pct: Option<u32>,
    pub temperature_c: Option<u32>,
    /// Power draw in milliwatts (`nvmlDeviceGetPowerUsage`; not every GPU has a
    /// sensor).
    pub power_mw: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    #[error("NVML is not available: {0}")]
    NvmlUnavailable(String),
    #[error("NVML has no GPU {index} (it sees {count})")]
    NoSuchDevice { index: u32, count: u32 },
    #[error("NVML failed: {0}")]
    Nvml(String),
    #[error(
        "no GPU information: {reason}. Declare the GPU in the config \
         ([worker.gpu] name and total_vram_mb) or run only the sim backend"
    )]
    Undeclared { reason: String },
}

/// A place to read GPUs from.
pub trait GpuSource: Send + Sync {
    fn device_count(&self) -> Result<u32, GpuError>;
    fn read(&self, index: u32) -> Result<DeviceReading, GpuError>;
    fn driver_version(&self) -> Option<String> {
        None
    }
}

/// NVML through nvml-wrapper (loaded at run time, so this builds and runs on
/// machines without an NVIDIA driver).
pub struct NvmlSource {
    nvml: nvml_wrapper::Nvml,
}

impl NvmlSource {
    pub fn open(library: Option<&Path>) -> Result<NvmlSource, GpuError> {
        let result = match library {
            Some(path) => nvml_wrapper::Nvml::builder()
                .lib_path(path.as_os_str())
                .init(),
            None => nvml_wrapper::Nvml::init(),
        };
        result
            .map(|nvml| NvmlSource { nvml })
            .map_err(|e| GpuError::NvmlUnavailable(e.to_string()))
    }
}

impl GpuSource for NvmlSource {
    fn device_count(&self) -> Result<u32, GpuError> {
        self.nvml
            .device_count()
            .map_err(|e| GpuError::Nvml(e.to_string()))
    }

    fn read(&self, index: u32) -> Result<DeviceReading, GpuError> {
        use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
        let count = self.device_count()?;
        if index >= count {
            return Err(GpuError::NoSuchDevice { index, count });
        }
        let d = self
            .nvml
            .device_by_index(index)
            .map_err(|e| GpuError::Nvml(e.to_string()))?;
        let memory = read_memory(&NvmlMemory {
            nvml: &self.nvml,
            device: &d,
        });
        Ok(DeviceReading {
            name: d.name().unwrap_or_else(|_| format!("GPU {index}")),
            uuid: d.uuid().unwrap_or_default(),
            memory,
            utilization_pct: d.utilization_rates().ok().map(|u| u.gpu),
            temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
            power_mw: d.power_usage().ok(),
        })
    }

    fn driver_version(&self) -> Option<String> {
        self.nvml.sys_driver_version().ok()
    }
}

/// Why a memory call gave no figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryCallError {
    /// The driver's library lacks the function (older drivers have no
    /// `nvmlDeviceGetMemoryInfo_v2`).
    Missing(String),
    /// NVML_ERROR_NOT_SUPPORTED.
    NotSupported,
    Other(String),
}

/// NVML's two memory calls, `(total, free)` in bytes: the seam that lets the
/// fallback from v2 to v1 be tested without a driver.
pub trait MemoryCalls {
    fn v2(&self) -> Result<(u64, u64), MemoryCallError>;
    fn v1(&self) -> Result<(u64, u64), MemoryCallError>;
}

/// Reads memory through `nvmlDeviceGetMemoryInfo_v2` (which leaves out memory
/// the driver reserves), falling back to the v1 call when the driver's library
/// does not have v2.
pub fn read_memory(calls: &dyn MemoryCalls) -> MemoryReading {
    let result = match calls.v2() {
        Err(MemoryCallError::Missing(why)) => {
            tracing::debug!("nvmlDeviceGetMemoryInfo_v2 is missing ({why}); using v1");
            calls.v1()
        }
        other => other,
    };
    match result {
        Ok((total_bytes, free_bytes)) => MemoryReading::Known {
            total_bytes,
            free_bytes,
        },
        Err(MemoryCallError::NotSupported) => MemoryReading::NotSupported,
        Err(MemoryCallError::Missing(e) | MemoryCallError::Other(e)) => MemoryReading::Failed(e),
    }
}

struct NvmlMemory<'a> {
    nvml: &'a nvml_wrapper::Nvml,
    device: &'a nvml_wrapper::Device<'a>,
}

fn call_error(e: nvml_wrapper::error::NvmlError) -> MemoryCallError {
    use nvml_wrapper::error::NvmlError;
    match e {
        NvmlError::FailedToLoadSymbol(why) => MemoryCallError::Missing(why),
        NvmlError::NotSupported => MemoryCallError::NotSupported,
        e => MemoryCallError::Other(e.to_string()),
    }
}

impl MemoryCalls for NvmlMemory<'_> {
    fn v2(&self) -> Result<(u64, u64), MemoryCallError> {
        self.device
            .memory_info()
            .map(|m| (m.total, m.free))
            .map_err(call_error)
    }

    fn v1(&self) -> Result<(u64, u64), MemoryCallError> {
        /// `nvmlMemory_t`: three `unsigned long long`, in bytes.
        #[repr(C)]
        struct Memory {
            total: u64,
            free: u64,
            used: u64,
        }
        let lib = self.nvml.lib();
        if let Err(e) = &lib.nvmlDeviceGetMemoryInfo {
            return Err(MemoryCallError::Missing(e.to_string()));
        }
        let mut m = Memory {
            total: 0,
            free: 0,
            used: 0,
        };
        // SAFETY: the symbol is present (checked above), the handle comes from
        // this NVML instance, and `Memory` has nvmlMemory_t's layout.
        let code = unsafe {
            lib.nvmlDeviceGetMemoryInfo(self.device.handle(), (&mut m as *mut Memory).cast())
        };
        let _ = m.used;
        nvml_wrapper::error::nvml_try(code)
            .map(|()| (m.total, m.free))
            .map_err(call_error)
    }
}

/// System memory in MiB (total, available) from `/proc/meminfo`.
pub fn system_memory_mb() -> Option<(u64, u64)> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
    };
    Some((field("MemTotal:")? / 1024, field("MemAvailable:")? / 1024))
}

/// Produces the worker's [`GpuInfo`] from a source (if any) and the config.
pub struct GpuProbe {
    source: Option<Box<dyn GpuSource>>,
    /// Why there is no source, for the log and errors.
    unavailable: Option<String>,
    cfg: GpuConfig,
    sim_only: bool,
    meminfo: fn() -> Option<(u64, u64)>,
}

impl GpuProbe {
    /// Opens NVML unless the config turned it off.
    pub fn from_config(cfg: &GpuConfig, sim_only: bool) -> GpuProbe {
        let (source, unavailable) = if cfg.nvml {
            match NvmlSource::open(cfg.nvml_library.as_deref()) {
                Ok(s) => (Some(Box::new(s) as Box<dyn GpuSource>), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (
                None,
                Some("NVML disabled in the config (worker.gpu.nvml = false)".to_string()),
            )
        };
        GpuProbe::new(source, unavailable, cfg.clone(), sim_only, system_memory_mb)
    }

    pub fn new(
        source: Option<Box<dyn GpuSource>>,
        unavailable: Option<String>,
        cfg: GpuConfig,
        sim_only: bool,
        meminfo: fn() -> Option<(u64, u64)>,
    ) -> GpuProbe {
        GpuProbe {
            source,
            unavailable,
            cfg,
            sim_only,
            meminfo,
        }
    }

    pub fn has_nvml(&self) -> bool {
        self.source.is_some()
    }

    /// Why NVML is not in use, if it is not.
    pub fn nvml_unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    pub fn driver_version(&self) -> Option<String> {
        self.source.as_ref()?.driver_version()
    }

    pub fn device_count(&self) -> Result<u32, GpuError> {
        match &self.source {
            Some(s) => s.device_count(),
            None => Err(GpuError::NvmlUnavailable(
                self.unavailable.clone().unwrap_or_default(),
            )),
        }
    }

    /// Reads the configured GPU now. Blocking (NVML is FFI): call from a blocking
    /// context.
    pub fn probe(&self) -> Result<GpuInfo, GpuError> {
        self.probe_index(self.cfg.index)
    }

    pub fn probe_index(&self, index: u32) -> Result<GpuInfo, GpuError> {
        let cfg = &self.cfg;
        let reading = match &self.source {
            Some(s) => match s.read(index) {
                Ok(r) => Some(r),
                // A sim-only worker needs no GPU figures to run.
                Err(e) if self.sim_only => return Ok(self.simulated(index, e.to_string())),
                Err(e) => return Err(e),
            },
            None => None,
        };
        if let Some(r) = reading {
            let (total, free, unified) = match r.memory {
                MemoryReading::Known {
                    total_bytes,
                    free_bytes,
                } => (total_bytes / MIB, free_bytes / MIB, false),
                MemoryReading::NotSupported => match (self.meminfo)() {
                    Some((total, avail)) => (total, avail, true),
                    None => match cfg.total_vram_mb {
                        Some(t) => (t, t, true),
                        None => {
                            return Err(GpuError::Undeclared {
                                reason:
                                    "the GPU has unified memory and /proc/meminfo is unreadable"
                                        .into(),
                            })
                        }
                    },
                },
                MemoryReading::Failed(e) => match cfg.total_vram_mb {
                    Some(t) => (t, t, false),
                    None if self.sim_only => {
                        return Ok(self.simulated(index, format!("memory info: {e}")))
                    }
                    None => return Err(GpuError::Nvml(format!("memory info: {e}"))),
                },
            };
            // A configured total caps what NVML says (memory reserved for other use).
            let total_vram_mb = cfg.total_vram_mb.map_or(total, |t| t.min(total));
            return Ok(GpuInfo {
                index,
                name: cfg.name.clone().unwrap_or(r.name),
                uuid: cfg.uuid.clone().unwrap_or(r.uuid),
                total_vram_mb,
                free_vram_mb: free.min(total_vram_mb),
                utilization_pct: r.utilization_pct,
                temperature_c: r.temperature_c,
                power_mw: r.power_mw,
                unified_memory: unified,
                source: Source::Nvml,
            });
        }
        let reason = self.unavailable.clone().unwrap_or_else(|| "no NVML".into());
        if let (Some(name), Some(total)) = (&cfg.name, cfg.total_vram_mb) {
            let unified = cfg.unified_memory.unwrap_or(false);
            let free = if unified {
                (self.meminfo)().map_or(total, |(_, avail)| avail.min(total))
            } else {
                total
            };
            return Ok(GpuInfo {
                index,
                name: name.clone(),
                uuid: cfg.uuid.clone().unwrap_or_default(),
                total_vram_mb: total,
                free_vram_mb: free,
                utilization_pct: None,
                temperature_c: None,
                power_mw: None,
                unified_memory: unified,
                source: Source::Config,
            });
        }
        if self.sim_only {
            return Ok(self.simulated(index, reason));
        }
        Err(GpuError::Undeclared { reason })
    }

    /// The GPU a sim-only worker reports when NVML gives no usable figures.
    fn simulated(&self, index: u32, why: String) -> GpuInfo {
        tracing::debug!("reporting a simulated GPU: {why}");
        let total = self.cfg.total_vram_mb.unwrap_or(24_576);
        GpuInfo {
            index,
            name: self
                .cfg
                .name
                .clone()
                .unwrap_or_else(|| "simulated GPU".into()),
            uuid: String::new(),
            total_vram_mb: total,
            free_vram_mb: total,
            utilization_pct: None,
            temperature_c: None,
            power_mw: None,
            unified_memory: false,
            source: Source::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(Result<DeviceReading, GpuError>);
    impl GpuSource for Fake {
        fn device_count(&self) -> Result<u32, GpuError> {
            Ok(1)
        }
        fn read(&self, _: u32) -> Result<DeviceReading, GpuError> {
            self.0.clone()
        }
    }

    fn reading(memory: MemoryReading) -> DeviceReading {
        DeviceReading {
            name: "NVIDIA GB10".into(),
            uuid: "GPU-1234".into(),
            memory,
            utilization_pct: Some(3),
            temperature_c: Some(41),
            power_mw: Some(87_250),
        }
    }

    fn meminfo() -> Option<(u64, u64)> {
        Some((128_000, 100_000))
    }

    fn no_meminfo() -> Option<(u64, u64)> {
        None
    }

    #[test]
    fn nvml_memory_is_reported_in_mib() {
        let src = Fake(Ok(reading(MemoryReading::Known {
            total_bytes: 24 * 1024 * MIB,
            free_bytes: 20 * 1024 * MIB,
        })));
        let probe = GpuProbe::new(
            Some(Box::new(src)),
            None,
            GpuConfig::default(),
            false,
            meminfo,
        );
        let g = probe.probe().unwrap();
        assert_eq!(
            (g.total_vram_mb, g.free_vram_mb, g.unified_memory),
            (24_576, 20_480, false)
        );
        assert_eq!(g.source, Source::Nvml);
        assert_eq!(g.temperature_c, Some(41));
        assert_eq!(g.power_mw, Some(87_250));
    }

    #[test]
    fn unified_memory_comes_from_meminfo_never_zero() {
        let src = Fake(Ok(reading(MemoryReading::NotSupported)));
        let probe = GpuProbe::new(
            Some(Box::new(src)),
            None,
            GpuConfig::default(),
            false,
            meminfo,
        );
        let g = probe.probe().unwrap();
        assert!(g.unified_memory);
        assert_eq!((g.total_vram_mb, g.free_vram_mb), (128_000, 100_000));
        assert_eq!(g.name, "NVIDIA GB10");

        let src = Fake(Ok(reading(MemoryReading::NotSupported)));
        let probe = GpuProbe::new(
            Some(Box::new(src)),
            None,
            GpuConfig::default(),
            false,
            no_meminfo,
        );
        assert!(matches!(probe.probe(), Err(GpuError::Undeclared { .. })));
    }

    #[test]
    fn without_nvml_the_config_declares_the_gpu_or_sim_stands_in() {
        let cfg = GpuConfig {
            name: Some("RTX 4090".into()),
            total_vram_mb: Some(24_564),
            ..GpuConfig::default()
        };
        let why = Some("libnvidia-ml.so.1: cannot open shared object file".to_string());
        let g = GpuProbe::new(None, why.clone(), cfg, false, meminfo)
            .probe()
            .unwrap();
        assert_eq!(
            (g.name.as_str(), g.total_vram_mb, g.source),
            ("RTX 4090", 24_564, Source::Config)
        );

        let err = GpuProbe::new(None, why.clone(), GpuConfig::default(), false, meminfo)
            .probe()
            .unwrap_err();
        assert!(err.to_string().contains("libnvidia-ml.so.1"), "{err}");
        assert!(err.to_string().contains("total_vram_mb"), "{err}");

        let g = GpuProbe::new(None, why, GpuConfig::default(), true, meminfo)
            .probe()
            .unwrap();
        assert_eq!(g.source, Source::None);
        assert!(g.total_vram_mb > 0);
    }

    /// Memory calls as an older or a current driver answers them.
    struct Calls {
        v2: Result<(u64, u64), MemoryCallError>,
        v1: Result<(u64, u64), MemoryCallError>,
    }
    impl MemoryCalls for Calls {
        fn v2(&self) -> Result<(u64, u64), MemoryCallError> {
            self.v2.clone()
        }
        fn v1(&self) -> Result<(u64, u64), MemoryCallError> {
            self.v1.clone()
        }
    }

    #[test]
    fn without_the_v2_memory_call_the_v1_call_is_used() {
        let old_driver = Calls {
            v2: Err(MemoryCallError::Missing(
                "undefined symbol: nvmlDeviceGetMemoryInfo_v2".into(),
            )),
            v1: Ok((8 * 1024 * MIB, 6 * 1024 * MIB)),
        };
        assert_eq!(
            read_memory(&old_driver),
            MemoryReading::Known {
                total_bytes: 8 * 1024 * MIB,
                free_bytes: 6 * 1024 * MIB
            }
        );
        // v2 is preferred when present; v1 is not consulted.
        let current = Calls {
            v2: Ok((24 * 1024 * MIB, 20 * 1024 * MIB)),
            v1: Err(MemoryCallError::Other("must not be called".into())),
        };
        assert!(
            matches!(read_memory(&current), MemoryReading::Known { total_bytes, .. } if total_bytes == 24 * 1024 * MIB)
        );
        // A GB10 answers Not Supported to either; a real failure stays one.
        let unified = Calls {
            v2: Err(MemoryCallError::Missing("v2".into())),
            v1: Err(MemoryCallError::NotSupported),
        };
        assert_eq!(read_memory(&unified), MemoryReading::NotSupported);
        let broken = Calls {
            v2: Err(MemoryCallError::Other("GPU is lost".into())),
            v1: Ok((1, 1)),
        };
        assert_eq!(
            read_memory(&broken),
            MemoryReading::Failed("GPU is lost".into())
        );
    }

    #[test]
    fn a_sim_only_worker_starts_when_nvml_loads_but_cannot_read_memory() {
        let failing = || Fake(Ok(reading(MemoryReading::Failed("Unknown Error".into()))));
        let g = GpuProbe::new(
            Some(Box::new(failing())),
            None,
            GpuConfig::default(),
            true,
            meminfo,
        )
        .probe()
        .unwrap();
        assert_eq!(g.source, Source::None);
        assert!(g.total_vram_mb > 0);
        let lost = Fake(Err(GpuError::Nvml("GPU is lost".into())));
        let g = GpuProbe::new(
            Some(Box::new(lost)),
            None,
            GpuConfig::default(),
            true,
            meminfo,
        )
        .probe()
        .unwrap();
        assert_eq!(g.source, Source::None);
        // A worker with real backends still refuses: it would schedule blind.
        let err = GpuProbe::new(
            Some(Box::new(failing())),
            None,
            GpuConfig::default(),
            false,
            meminfo,
        )
        .probe()
        .unwrap_err();
        assert!(err.to_string().contains("Unknown Error"), "{err}");
    }

    #[test]
    fn the_real_nvml_path_fails_cleanly_without_a_driver() {
        // On CI there is no NVIDIA driver: opening NVML must be an error, not a crash.
        let missing = Path::new("/nonexistent/libnvidia-ml.so.1");
        match NvmlSource::open(Some(missing)) {
            Err(GpuError::NvmlUnavailable(msg)) => assert!(!msg.is_empty()),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a missing library cannot load"),
        }
    }

    #[test]
    fn meminfo_parses() {
        let text = "MemTotal:       131072000 kB\nMemFree: 1 kB\nMemAvailable:   65536000 kB\n";
        assert_eq!(parse_meminfo(text), Some((128_000, 64_000)));
        assert_eq!(parse_meminfo("garbage"), None);
    }
}
