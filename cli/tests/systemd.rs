//! The systemd units verify cleanly with `systemd-analyze verify`, including the
//! network fence drop-in that `kiln config fence` generates.

use std::path::Path;
use std::process::Command;

use kiln_testkit::{bin, Scratch};

fn units_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let s = Scratch::new();
    let dir = s.path().join("units");
    std::fs::create_dir_all(&dir).unwrap();
    let bin_dir = bin("kiln").parent().unwrap().to_path_buf();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(units_dir()).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".service") {
            continue;
        }
        // Verify a template through one of its instances.
        let target = if name.ends_with("@.service") {
            name.replace("@.service", "@0.service")
        } else {
            name.to_string()
        };
        // The units run the installed binaries; point them at the built ones.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
        std::fs::write(dir.join(&target), text).unwrap();
        files.push(dir.join(target));
    }
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in ["kiln-broker.service", "kiln-worker@0.service"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from systemd/: {names:?}"
        );
    }

    // The fence drop-in, generated from a config with a private network.
    let cfg = s.path().join("kiln.toml");
    std::fs::write(
        &cfg,
        "[broker]\nallowed_networks = [\"10.20.0.0/16\", \"fd00::/64\"]\nmetrics_listen = \"10.20.0.1:9470\"\nmetrics_allowed_networks = [\"10.30.0.5/32\", \"10.20.0.0/16\"]\n",
    )
    .unwrap();
    let fence = Command::new(bin("kiln"))
        .args(["config", "fence", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        fence.status.success(),
        "{}",
        String::from_utf8_lossy(&fence.stderr)
    );
    let dropin = String::from_utf8(fence.stdout).unwrap();
    assert!(
        dropin.contains("IPAddressAllow=10.20.0.0/16 fd00::/64 10.30.0.5/32\n"),
        "{dropin}"
    );
    let dropin_dir = dir.join("kiln-broker.service.d");
    std::fs::create_dir_all(&dropin_dir).unwrap();
    std::fs::write(dropin_dir.join("network.conf"), dropin).unwrap();

    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&files)
        .output()
        .expect("systemd-analyze is installed (scripts/test-deps installs it)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{report}"
    );
    // Warnings (unknown keys, bad values) do not fail verify; they fail this test.
    let complaints: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        // Running as root in a container without systemd as PID 1 is not a unit problem.
        .filter(|l| {
            !l.contains("System has not been booted with systemd")
                && !l.contains("Failed to connect to bus")
        })
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze complained:\n{}",
        complaints.join("\n")
    );

    let broker = std::fs::read_to_string(dir.join("kiln-broker.service")).unwrap();
    for needle in [
        "Type=notify",
        "WatchdogSec=",
        "IPAddressDeny=any",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "Restart=on-failure",
    ] {
        assert!(
            broker.contains(needle),
            "kiln-broker.service lacks {needle}"
        );
    }
    let worker = std::fs::read_to_string(dir.join("kiln-worker@0.service")).unwrap();
    for needle in [
        "Type=notify",
        "CUDA_VISIBLE_DEVICES=%i",
        "--gpu %i",
        "PrivateDevices=no",
        "EnvironmentFile=-/etc/kiln/worker-%i.env",
    ] {
        assert!(
            worker.contains(needle),
            "kiln-worker@.service lacks {needle}"
        );
    }
}
