//! Fleet commands: workers, models, health, gpu-info, config check.

use std::path::PathBuf;
use std::process::ExitCode;

use kiln_config::KilnConfig;
use kiln_protocol::Client;
use kiln_worker::gpu::GpuProbe;
use serde_json::Value;

use crate::print_json;
use crate::table::Table;

fn gib(mb: u64) -> String {
    format!("{:.1}", mb as f64 / 1024.0)
}

pub async fn workers(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let workers = client.workers().await?;
    if json {
        print_json(&workers);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new([
        "WORKER",
        "HOST",
        "GPU",
        "VRAM FREE/TOTAL GiB",
        "LOAD TEMP POWER",
        "RESIDENT MODELS",
        "STATE",
        "JOB",
        "BACKENDS",
    ]);
    for w in workers {
        let backends: Vec<String> = w
            .backends
            .iter()
            .map(|b| format!("{}{}", b.backend, if b.healthy { "" } else { " (down)" }))
            .collect();
        let gpu = if w.gpu.unified_memory {
            format!("{} (unified)", w.gpu.name)
        } else {
            w.gpu.name.clone()
        };
        t.row([
            w.worker_id,
            w.hostname,
            gpu,
            format!("{} / {}", gib(w.gpu.free_vram_mb), gib(w.gpu.total_vram_mb)),
            gpu_readings(&w.gpu),
            if w.resident.is_empty() {
                w.loaded_model.unwrap_or_else(|| "-".into())
            } else {
                w.resident.join(", ")
            },
            w.state.as_str().to_string(),
            w.current_job
                .map(|j| j.to_string())
                .unwrap_or_else(|| "-".into()),
            backends.join(", "),
        ]);
    }
    t.print();
    Ok(ExitCode::SUCCESS)
}

/// `98% 71 C 412 W`: NVML's current readings, each left out when the worker
/// does not report it; `-` when none is known.
fn gpu_readings(g: &kiln_protocol::worker::GpuInfo) -> String {
    let parts: Vec<String> = [
        g.utilization_pct.map(|u| format!("{u}%")),
        g.temperature_c.map(|t| format!("{t} C")),
        g.power_mw.map(|p| format!("{:.0} W", p as f64 / 1000.0)),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

pub async fn models(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let models = client.models().await?;
    if json {
        print_json(&models);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(["MODEL", "KIND", "BACKEND", "WORKERS", "LOADED ON"]);
    for m in models {
        t.row([
            m.name,
            m.kind,
            m.backend.to_string(),
            m.workers.join(","),
            m.loaded_on.join(","),
        ]);
    }
    t.print();
    Ok(ExitCode::SUCCESS)
}

pub async fn health(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let h = client.health().await?;
    if json {
        print_json(&h);
    } else {
        println!(
            "broker {} up {} s, {}",
            h.version,
            h.uptime_s,
            if h.durable { "durable" } else { "in memory" }
        );
        println!(
            "workers {} online ({} idle, {} busy, {} unhealthy)",
            h.workers_online, h.workers_idle, h.workers_busy, h.workers_unhealthy
        );
        println!(
            "jobs {} queued, {} running, {} finished",
            h.queued, h.running, h.finished
        );
        println!("protocol errors {}", h.protocol_errors);
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints every GPU NVML sees with the Wan2GP settings the VRAM table gives it,
/// and the table itself. Exit code 7 when no GPU could be read at all.
pub fn gpu_info(cfg: &KilnConfig, json: bool) -> anyhow::Result<ExitCode> {
    let table = &cfg.worker.wan2gp.vram_table;
    let probe = GpuProbe::from_config(&cfg.worker.gpu, false);
    let mut gpus = Vec::new();
    match probe.device_count() {
        Ok(n) => {
            for i in 0..n {
                gpus.push(probe.probe_index(i));
            }
        }
        Err(_) => gpus.push(probe.probe()),
    }
    let read: Vec<_> = gpus.into_iter().filter_map(Result::ok).collect();
    if json {
        let rows: Vec<Value> = read
            .iter()
            .map(|g| {
                serde_json::json!({
                    "gpu": g,
                    "wan2gp": table.row_for(g.total_vram_mb),
                })
            })
            .collect();
        print_json(&serde_json::json!({
            "nvml": probe.nvml_unavailable().is_none(),
            "nvml_error": probe.nvml_unavailable(),
            "driver": probe.driver_version(),
            "gpus": rows,
            "wan2gp_vram_table": table,
        }));
    } else {
        match probe.nvml_unavailable() {
            None => println!(
                "NVML: available, driver {}",
                probe.driver_version().unwrap_or_else(|| "?".into())
            ),
            Some(why) => {
                // The probe's reason may already say "NVML is not available".
                let why = why.strip_prefix("NVML is not available: ").unwrap_or(why);
                println!("NVML: not available: {why}")
            }
        }
        for g in &read {
            println!();
            println!("GPU {}: {} {}", g.index, g.name, g.uuid);
            println!(
                "  memory   {} GiB total, {} GiB free{}",
                gib(g.total_vram_mb),
                gib(g.free_vram_mb),
                if g.unified_memory {
                    " (unified: shared with the CPU, read from /proc/meminfo)"
                } else {
                    ""
                }
            );
            if let Some(u) = g.utilization_pct {
                println!("  load     {u}%");
            }
            if let Some(t) = g.temperature_c {
                println!("  temp     {t} C");
            }
            if let Some(p) = g.power_mw {
                println!("  power    {:.1} W", p as f64 / 1000.0);
            }
            println!("  source   {:?}", g.source);
            match table.row_for(g.total_vram_mb) {
                Some(row) => println!(
                    "  wan2gp   profile {}, video up to {} and {} frames",
                    row.profile, row.max_resolution, row.max_frames
                ),
                None => println!(
                    "  wan2gp   below the smallest row of the VRAM table: small image models only"
                ),
            }
        }
        println!();
        println!("Wan2GP VRAM table ([worker.wan2gp.vram_table]; a card qualifies with 6% less than a row's minimum):");
        let mut t = Table::new(["MIN VRAM GiB", "PROFILE", "MAX RESOLUTION", "MAX FRAMES"]);
        for row in table.rows() {
            t.row([
                gib(row.min_vram_mb),
                row.profile_arg(),
                row.max_resolution.clone(),
                row.max_frames.to_string(),
            ]);
        }
        t.print();
    }
    if read.is_empty() {
        if !json {
            println!("\nNo GPU could be read. Declare one in [worker.gpu] (name, total_vram_mb) or run the sim backend.");
        }
        return Ok(crate::exit::Outcome::NoGpu.into());
    }
    Ok(ExitCode::SUCCESS)
}

/// Validates the configuration (already loaded) and prints it with tokens hidden.
pub fn config_check(cfg: &KilnConfig, files: &[PathBuf], json: bool) -> anyhow::Result<ExitCode> {
    // Tokens in files must be readable too.
    cfg.broker_client_token()?;
    cfg.broker_worker_token()?;
    cfg.worker_token()?;
    cfg.client_token()?;
    let mut value = serde_json::to_value(cfg)?;
    redact(&mut value);
    if json {
        print_json(&serde_json::json!({ "files": files, "config": value }));
        return Ok(ExitCode::SUCCESS);
    }
    if files.is_empty() {
        println!("# no config file: built-in defaults and KILN_* environment only");
    }
    for f in files {
        println!("# loaded {}", f.display());
    }
    for (name, ep) in [
        ("broker.frontend", &cfg.broker.frontend),
        ("broker.backend", &cfg.broker.backend),
        ("broker.events", &cfg.broker.events),
    ] {
        if !kiln_config::is_loopback_endpoint(ep) {
            println!("# note: {name} = {ep} is reachable from the network; keep it on a private network or VPN");
        }
    }
    println!("{}", serde_json::to_string_pretty(&value)?);
    println!("# configuration is valid");
    Ok(ExitCode::SUCCESS)
}

/// Prints the `IPAddressAllow=` drop-in for the broker unit: the networks of
/// workers and clients, and those of the Prometheus servers that scrape
/// `broker.metrics_listen`. (Workers only connect out; their unit has no fence.)
pub fn config_fence(cfg: &KilnConfig) -> anyhow::Result<ExitCode> {
    let b = &cfg.broker;
    println!("# /etc/systemd/system/kiln-broker.service.d/network.conf");
    println!(
        "# Generated by `kiln config fence` from broker.allowed_networks and broker.metrics_allowed_networks."
    );
    println!("# The unit itself allows only localhost (IPAddressDeny=any).");
    println!("[Service]");
    let mut networks: Vec<&str> = Vec::new();
    for net in b.allowed_networks.iter().chain(&b.metrics_allowed_networks) {
        if !networks.contains(&net.as_str()) {
            networks.push(net);
        }
    }
    if let Some(addr) = b.metrics_addr()? {
        if !addr.ip().is_loopback() && b.metrics_allowed_networks.is_empty() {
            println!(
                "# note: broker.metrics_listen = {addr} is not loopback: list the Prometheus servers' networks in broker.metrics_allowed_networks"
            );
        }
    }
    if networks.is_empty() {
        println!("# broker.allowed_networks and broker.metrics_allowed_networks are empty: loopback only.");
    } else {
        println!("IPAddressAllow={}", networks.join(" "));
    }
    Ok(ExitCode::SUCCESS)
}

fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                if k.ends_with("token") && !val.is_null() {
                    *val = Value::String("<redacted>".into());
                } else {
                    redact(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_readings_show_what_the_worker_reports() {
        let mut g = kiln_protocol::worker::GpuInfo::default();
        assert_eq!(gpu_readings(&g), "-");
        g.utilization_pct = Some(98);
        g.temperature_c = Some(71);
        g.power_mw = Some(412_400);
        assert_eq!(gpu_readings(&g), "98% 71 C 412 W");
        g.utilization_pct = None;
        assert_eq!(gpu_readings(&g), "71 C 412 W");
    }
}
