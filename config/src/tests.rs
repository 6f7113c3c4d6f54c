//! Tests of loading, layering and validating the configuration.

use super::*;
use figment::Jail;

#[test]
fn defaults_are_loopback_and_valid() {
    let c = KilnConfig::default().validated().unwrap();
    for ep in [&c.broker.frontend, &c.broker.backend, &c.broker.events] {
        assert!(is_loopback_endpoint(ep), "{ep}");
    }
    assert!(!is_loopback_endpoint("tcp://0.0.0.0:5555"));
    assert!(is_loopback_endpoint("tcp://[::1]:5555"));
}

#[test]
fn file_then_env_layering_and_errors_name_key_and_source() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "kiln.toml",
            "[broker]\nfrontend = \"tcp://127.0.0.1:6000\"\nheartbeat_ms = 500\n[worker.sim]\nstep_ms = 5\n",
        )?;
        jail.set_env("KILN_BROKER__HEARTBEAT_MS", "250");
        jail.set_env("KILN_TEST_COMFYUI_URL", "http://elsewhere");
        jail.set_env("KILN_WORKER__LABELS", "[\"fast\", \"big\"]");
        let c = KilnConfig::load(&["kiln.toml".into()]).unwrap();
        assert_eq!(c.broker.frontend, "tcp://127.0.0.1:6000");
        assert_eq!(c.broker.heartbeat_ms, 250, "environment wins over the file");
        assert_eq!(c.worker.sim.step_ms, 5);
        assert_eq!(c.worker.labels, ["fast", "big"]);

        jail.set_env("KILN_BROKER__HEARTBEAT_MS", "soon");
        let err = KilnConfig::load(&["kiln.toml".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.heartbeat_ms"), "{err}");
        assert!(err.contains("KILN_"), "{err}");
        jail.set_env("KILN_BROKER__HEARTBEAT_MS", "250");

        jail.create_file("typo.toml", "[broker]\nfrontnd = \"tcp://127.0.0.1:1\"\n")?;
        let err = KilnConfig::load(&["typo.toml".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("frontnd") && err.contains("typo.toml"),
            "{err}"
        );

        let err = KilnConfig::load(&["absent.toml".into()]).unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));

        jail.create_file("bad.toml", "[client]\nbroker = \"localhost\"\n")?;
        let err = KilnConfig::load(&["bad.toml".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("client.broker"), "{err}");
        Ok(())
    });
}

/// Every documented example under `config/` loads as written.
#[test]
fn the_documented_examples_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    Jail::expect_with(|jail| {
        let cfg = KilnConfig::load(&[dir.join("kiln.example.toml")]).expect("kiln.example.toml");
        let defaults = KilnConfig::default();
        assert_eq!(cfg.broker.frontend, defaults.broker.frontend);
        assert_eq!(
            cfg.broker.limits, defaults.broker.limits,
            "the example shows the default limits"
        );
        assert_eq!(cfg.broker.retention, defaults.broker.retention);
        assert_eq!(cfg.client, defaults.client);
        assert_eq!(cfg.worker.sim, defaults.worker.sim);
        assert_eq!(cfg.worker.backends, defaults.worker.backends);

        let broker = KilnConfig::load(&[dir.join("multi-host/broker.toml")])
            .expect("multi-host/broker.toml");
        assert_eq!(broker.broker.allowed_networks, ["10.20.0.0/16"]);
        assert_eq!(broker.broker.metrics_allowed_networks, ["10.30.0.5/32"]);
        assert_eq!(
            broker.broker.metrics_addr().unwrap().map(|a| a.port()),
            Some(9470)
        );
        assert!(!is_loopback_endpoint(&broker.broker.frontend));
        assert_eq!(broker.dashboard.bind, "10.20.0.1:8790");
        assert!(broker.dashboard.token_file.is_some());
        let worker = KilnConfig::load(&[dir.join("multi-host/worker.toml")])
            .expect("multi-host/worker.toml");
        assert_eq!(worker.worker.broker, "tcp://10.20.0.1:5556");

        // The per-GPU environment file, as systemd would pass it.
        let env = std::fs::read_to_string(dir.join("worker-1.example.env")).unwrap();
        for line in env
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (k, v) = line.split_once('=').expect("KEY=value");
            jail.set_env(k, v);
        }
        let per_gpu =
            KilnConfig::load(&[dir.join("multi-host/worker.toml")]).expect("worker with env");
        assert_eq!(per_gpu.worker.id.as_deref(), Some("box1-gpu1"));
        assert_eq!(per_gpu.worker.labels, ["rtx4090", "fast"]);
        assert_eq!(per_gpu.worker.comfyui.port, 8189);
        assert_eq!(
            per_gpu
                .worker
                .metrics_addr()
                .unwrap()
                .map(|a| a.to_string()),
            Some("10.20.0.2:9481".into())
        );
        Ok(())
    });
}

#[test]
fn metrics_listen_defaults_to_loopback_per_gpu_and_errors_name_the_key() {
    let mut c = KilnConfig::default();
    let broker = c.broker.metrics_addr().unwrap().unwrap();
    assert!(broker.ip().is_loopback(), "{broker}");
    c.worker.gpu.index = 3;
    let worker = c.worker.metrics_addr().unwrap().unwrap();
    assert!(worker.ip().is_loopback());
    assert_eq!(worker.port(), DEFAULT_WORKER_METRICS_PORT + 3);
    c.worker.metrics_listen = Some(String::new());
    assert_eq!(c.worker.metrics_addr().unwrap(), None, "\"\" turns it off");
    c.broker.metrics_listen = "localhost".into();
    let err = c.clone().validated().unwrap_err().to_string();
    assert!(err.contains("broker.metrics_listen"), "{err}");
    c.broker.metrics_listen = "0.0.0.0:9470".into();
    c.broker.metrics_allowed_networks = vec!["prometheus".into()];
    let err = c.validated().unwrap_err().to_string();
    assert!(err.contains("broker.metrics_allowed_networks"), "{err}");
}

#[test]
fn networks_must_be_cidrs() {
    for ok in ["10.0.0.0/24", "192.168.1.7", "fd00::/64"] {
        assert!(is_cidr(ok), "{ok}");
    }
    for bad in ["10.0.0.0/33", "ten", "10.0.0/8", "fd00::/129", ""] {
        assert!(!is_cidr(bad), "{bad}");
    }
}

#[test]
fn tokens_resolve_from_file_and_stay_redacted() {
    Jail::expect_with(|jail| {
        jail.create_file("token", "  s3cret\n")?;
        jail.create_file(
            "kiln.toml",
            "[broker]\nclient_token_file = \"token\"\nworker_token = 12345\n",
        )?;
        let c = KilnConfig::load(&["kiln.toml".into()]).unwrap();
        let t = c.broker_client_token().unwrap().unwrap();
        assert_eq!(t.expose(), "s3cret");
        assert_eq!(format!("{t:?}"), "<redacted>");
        assert_eq!(c.broker_worker_token().unwrap().unwrap().expose(), "12345");
        Ok(())
    });
}

#[test]
fn worker_names_follow_the_brokers_rules_and_errors_name_the_entry() {
    let mut c = KilnConfig::default();
    c.worker.id = Some("box 1".into());
    match c.clone().validated() {
        Err(ConfigError::Invalid { key, message }) => {
            assert_eq!(key, "worker.id");
            assert!(message.contains("1 to 64 characters"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    c.worker.id = None;
    c.worker.labels = vec!["ok".into(), "not ok".into()];
    match c.clone().validated() {
        Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "worker.labels[1]"),
        other => panic!("{other:?}"),
    }
    c.worker.labels = (0..17).map(|i| format!("l{i}")).collect();
    match c.validated() {
        Err(ConfigError::Invalid { key, message }) => {
            assert_eq!(key, "worker.labels");
            assert!(message.contains("16"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}
