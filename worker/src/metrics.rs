//! The worker's Prometheus metrics: its GPU, its backends and the phases of the
//! jobs it runs.
//!
//! GPU figures come from the same readings the worker sends the broker
//! ([`Status`], refreshed every two heartbeats). They are exported only when
//! they were read from a real GPU (NVML, or the backend's own report when NVML
//! is missing) and only the ones the GPU gave: a worker without a GPU, or a GPU
//! without a power sensor, has those series absent, never 0. Served by
//! [`kiln_metrics::serve`] on `worker.metrics_listen`; names in docs/metrics.md.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_protocol::worker::{GpuInfo, GpuSource};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::backend::Phase;
use crate::runner::Status;

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    worker: String,
    gpu: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    worker: String,
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    worker: String,
    backend: &'static str,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    worker: String,
    backend: &'static str,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    worker: String,
    backend: &'static str,
    outcome: &'static str,
}

type FloatGauges = Family<GpuLabels, Gauge<f64, std::sync::atomic::AtomicU64>>;

fn phase_durations() -> Histogram {
    Histogram::new(kiln_metrics::duration_buckets())
}

/// Every metric of one worker; cheap to share.
pub struct WorkerMetrics {
    worker: String,
    registry: Arc<Registry>,
    memory_total: FloatGauges,
    memory_used: FloatGauges,
    memory_free: FloatGauges,
    utilization: FloatGauges,
    temperature: FloatGauges,
    power: FloatGauges,
    backend_healthy: Family<BackendLabels, Gauge>,
    resident: Family<ModelLabels, Gauge>,
    phases: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    attempts: Family<OutcomeLabels, Counter>,
    /// The label sets last set, to remove what is no longer true.
    shown: Mutex<Shown>,
}

#[derive(Default)]
struct Shown {
    gpu: Option<GpuLabels>,
    models: Vec<ModelLabels>,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl WorkerMetrics {
    pub fn new(worker_id: &str) -> WorkerMetrics {
        let mut r = Registry::default();
        let mut gauge = |name: &str, help: &str| {
            let g = FloatGauges::default();
            r.register(name, help, g.clone());
            g
        };
        let memory_total = gauge(
            "kiln_gpu_memory_total_bytes",
            "GPU memory the worker schedules on (system memory on a unified-memory GPU)",
        );
        let memory_used = gauge(
            "kiln_gpu_memory_used_bytes",
            "GPU memory in use (total minus free)",
        );
        let memory_free = gauge("kiln_gpu_memory_free_bytes", "GPU memory free");
        let utilization = gauge(
            "kiln_gpu_utilization_ratio",
            "Share of the last sample period the GPU was busy (NVML), 0 to 1",
        );
        let temperature = gauge(
            "kiln_gpu_temperature_celsius",
            "GPU core temperature (NVML)",
        );
        let power = gauge("kiln_gpu_power_watts", "GPU power draw (NVML)");
        let backend_healthy = Family::<BackendLabels, Gauge>::default();
        r.register(
            "kiln_worker_backend_healthy",
            "1 when the backend answers its health check, 0 when it is down",
            backend_healthy.clone(),
        );
        let resident = Family::<ModelLabels, Gauge>::default();
        r.register(
            "kiln_worker_resident_models",
            "1 for each model the backend has loaded on the GPU",
            resident.clone(),
        );
        let phases: Family<PhaseLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(phase_durations);
        r.register(
            "kiln_worker_job_phase_seconds",
            "Time attempts spent in each phase on the generator (upload, queued, sampling, download)",
            phases.clone(),
        );
        let attempts = Family::<OutcomeLabels, Counter>::default();
        r.register(
            "kiln_worker_attempts",
            "Attempts this worker ran to the end, by backend and outcome",
            attempts.clone(),
        );
        WorkerMetrics {
            worker: worker_id.to_string(),
            registry: Arc::new(r),
            memory_total,
            memory_used,
            memory_free,
            utilization,
            temperature,
            power,
            backend_healthy,
            resident,
            phases,
            attempts,
            shown: Mutex::default(),
        }
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Sets the GPU and backend figures from a fresh status; `resident` lists the
    /// models each backend holds on the GPU (most recently used first).
    pub fn update(&self, status: &Status, resident: &[(kiln_protocol::Backend, Vec<String>)]) {
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        self.update_gpu(&status.gpu, &mut shown);
        for b in &status.backends {
            self.backend_healthy
                .get_or_create(&BackendLabels {
                    worker: self.worker.clone(),
                    backend: b.backend.as_str(),
                })
                .set(b.healthy as i64);
        }
        let now: Vec<ModelLabels> = resident
            .iter()
            .flat_map(|(b, models)| {
                models.iter().map(|model| ModelLabels {
                    worker: self.worker.clone(),
                    backend: b.as_str(),
                    model: model.clone(),
                })
            })
            .collect();
        for old in shown.models.iter().filter(|m| !now.contains(*m)) {
            self.resident.remove(old);
        }
        for m in &now {
            self.resident.get_or_create(m).set(1);
        }
        shown.models = now;
    }

    fn update_gpu(&self, gpu: &GpuInfo, shown: &mut Shown) {
        let labels = GpuLabels {
            worker: self.worker.clone(),
            gpu: gpu.index.to_string(),
            name: gpu.name.clone(),
        };
        // A new label set (renamed GPU): drop every series of the old one.
        if let Some(old) = shown.gpu.take().filter(|old| *old != labels) {
            for g in self.gpu_gauges() {
                g.remove(&old);
            }
        }
        // Declared (config) or simulated figures are not readings of a GPU.
        let real = matches!(gpu.source, GpuSource::Nvml | GpuSource::Backend);
        let set = |g: &FloatGauges, v: Option<f64>| match v.filter(|_| real) {
            Some(v) => {
                g.get_or_create(&labels).set(v);
            }
            None => {
                g.remove(&labels);
            }
        };
        let (total, free) = (
            gpu.total_vram_mb as f64 * MIB,
            gpu.free_vram_mb as f64 * MIB,
        );
        let memory = gpu.total_vram_mb > 0;
        set(&self.memory_total, memory.then_some(total));
        set(&self.memory_free, memory.then_some(free));
        set(&self.memory_used, memory.then_some((total - free).max(0.0)));
        set(
            &self.utilization,
            gpu.utilization_pct.map(|u| u as f64 / 100.0),
        );
        set(&self.temperature, gpu.temperature_c.map(f64::from));
        set(&self.power, gpu.power_mw.map(|p| p as f64 / 1000.0));
        shown.gpu = Some(labels);
    }

    fn gpu_gauges(&self) -> [&FloatGauges; 6] {
        [
            &self.memory_total,
            &self.memory_used,
            &self.memory_free,
            &self.utilization,
            &self.temperature,
            &self.power,
        ]
    }

    /// An attempt ended with `outcome` (`succeeded`, `failed`, `cancelled`) after
    /// going through `phases`.
    pub fn attempt_done(
        &self,
        backend: kiln_protocol::Backend,
        outcome: &'static str,
        phases: &[(Phase, Duration)],
    ) {
        let backend = backend.as_str();
        for (phase, took) in phases {
            self.phases
                .get_or_create(&PhaseLabels {
                    worker: self.worker.clone(),
                    backend,
                    phase: phase.as_str(),
                })
                .observe(took.as_secs_f64());
        }
        self.attempts
            .get_or_create(&OutcomeLabels {
                worker: self.worker.clone(),
                backend,
                outcome,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DeviceReading, GpuError, GpuProbe, GpuSource as Source, MemoryReading};
    use kiln_config::GpuConfig;
    use kiln_protocol::worker::BackendInventory;
    use kiln_protocol::Backend;

    /// NVML as a card answers it; `power` is `None` for a card without a sensor.
    struct FakeNvml {
        power_mw: Option<u32>,
    }

    impl Source for FakeNvml {
        fn device_count(&self) -> Result<u32, GpuError> {
            Ok(1)
        }
        fn read(&self, index: u32) -> Result<DeviceReading, GpuError> {
            if index != 0 {
                return Err(GpuError::NoSuchDevice { index, count: 1 });
            }
            Ok(DeviceReading {
                name: "NVIDIA GeForce RTX 4090".into(),
                uuid: "GPU-5f2a".into(),
                memory: MemoryReading::Known {
                    total_bytes: 24_564 * 1024 * 1024,
                    free_bytes: 20_000 * 1024 * 1024,
                },
                utilization_pct: Some(87),
                temperature_c: Some(66),
                power_mw: self.power_mw,
            })
        }
    }

    fn status(gpu: GpuInfo) -> Status {
        Status {
            gpu,
            backends: vec![BackendInventory {
                backend: Backend::Sim,
                healthy: true,
                models: Vec::new(),
                detail: None,
                params: None,
            }],
            healthy: true,
        }
    }

    fn meminfo() -> Option<(u64, u64)> {
        None
    }

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn nvml_readings_become_gauges_in_base_units() {
        let probe = GpuProbe::new(
            Some(Box::new(FakeNvml {
                power_mw: Some(312_500),
            })),
            None,
            GpuConfig::default(),
            false,
            meminfo,
        );
        let m = WorkerMetrics::new("box1-gpu0");
        m.update(
            &status(probe.probe().unwrap()),
            &[(Backend::Sim, vec!["sim-sdxl".into(), "sim-sd15".into()])],
        );
        let text = kiln_metrics::encode(&m.registry());
        let mib = 1024.0 * 1024.0;
        assert_eq!(
            sample(&text, "kiln_gpu_memory_total_bytes"),
            Some(24_564.0 * mib)
        );
        assert_eq!(
            sample(&text, "kiln_gpu_memory_free_bytes"),
            Some(20_000.0 * mib)
        );
        assert_eq!(
            sample(&text, "kiln_gpu_memory_used_bytes"),
            Some(4_564.0 * mib)
        );
        assert_eq!(sample(&text, "kiln_gpu_utilization_ratio"), Some(0.87));
        assert_eq!(sample(&text, "kiln_gpu_temperature_celsius"), Some(66.0));
        assert_eq!(sample(&text, "kiln_gpu_power_watts"), Some(312.5));
        assert!(text.contains(r#"name="NVIDIA GeForce RTX 4090""#), "{text}");
        assert_eq!(sample(&text, "kiln_worker_backend_healthy"), Some(1.0));
        assert!(
            text.contains(r#"kiln_worker_resident_models{worker="box1-gpu0",backend="sim",model="sim-sdxl"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kiln_worker_resident_models{worker="box1-gpu0",backend="sim",model="sim-sd15"} 1"#),
            "every resident model has its series: {text}"
        );

        // One model is evicted: its series goes, the other stays.
        m.update(
            &status(probe.probe().unwrap()),
            &[(Backend::Sim, vec!["sim-sd15".into()])],
        );
        let text = kiln_metrics::encode(&m.registry());
        assert!(!text.contains("model=\"sim-sdxl\""), "{text}");
        assert!(text.contains("model=\"sim-sd15\""), "{text}");
    }

    #[test]
    fn a_missing_sensor_or_a_missing_gpu_leaves_series_absent_not_zero() {
        let probe = GpuProbe::new(
            Some(Box::new(FakeNvml { power_mw: None })),
            None,
            GpuConfig::default(),
            false,
            meminfo,
        );
        let m = WorkerMetrics::new("w");
        m.update(&status(probe.probe().unwrap()), &[]);
        let text = kiln_metrics::encode(&m.registry());
        assert_eq!(sample(&text, "kiln_gpu_power_watts"), None, "{text}");
        assert_eq!(sample(&text, "kiln_gpu_temperature_celsius"), Some(66.0));

        // No NVML at all: a sim-only worker runs on a simulated GPU.
        let none = GpuProbe::new(
            None,
            Some("libnvidia-ml.so.1: cannot open shared object file".into()),
            GpuConfig::default(),
            true,
            meminfo,
        );
        let gpu = none.probe().unwrap();
        assert_eq!(gpu.source, GpuSource::None);
        let m = WorkerMetrics::new("w");
        m.update(&status(gpu), &[]);
        let text = kiln_metrics::encode(&m.registry());
        for name in [
            "kiln_gpu_memory_total_bytes",
            "kiln_gpu_memory_free_bytes",
            "kiln_gpu_utilization_ratio",
            "kiln_gpu_temperature_celsius",
            "kiln_gpu_power_watts",
        ] {
            assert_eq!(sample(&text, name), None, "{name} in {text}");
        }
        // The worker's own metrics are still there.
        assert_eq!(sample(&text, "kiln_worker_backend_healthy"), Some(1.0));
    }

    #[test]
    fn phases_are_observed_per_backend() {
        let m = WorkerMetrics::new("w");
        m.attempt_done(
            Backend::Comfyui,
            "succeeded",
            &[
                (Phase::Upload, Duration::from_millis(20)),
                (Phase::Queued, Duration::from_millis(500)),
                (Phase::Sampling, Duration::from_secs(9)),
                (Phase::Download, Duration::from_millis(80)),
            ],
        );
        let text = kiln_metrics::encode(&m.registry());
        assert!(
            text.contains(r#"kiln_worker_job_phase_seconds_count{worker="w",backend="comfyui",phase="sampling"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kiln_worker_job_phase_seconds_sum{worker="w",backend="comfyui",phase="sampling"} 9"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"kiln_worker_attempts_total{worker="w",backend="comfyui",outcome="succeeded"} 1"#
            ),
            "{text}"
        );
    }
}
