//! `kiln demo` runs to the end and writes real PNGs, with no GPU.

use std::process::Command;

use kiln_testkit::{bin, Scratch};

#[test]
fn kiln_demo_runs_to_the_end_and_writes_pngs() {
    let s = Scratch::new();
    let out_dir = s.path().join("demo-out");
    let out = Command::new(bin("kiln"))
        .args([
            "demo",
            "--jobs",
            "3",
            "--steps",
            "4",
            "--step-ms",
            "5",
            "--out",
        ])
        .arg(&out_dir)
        .env_remove("KILN_CONFIG")
        .env("HOME", s.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kiln demo failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("3 of 3 jobs succeeded"), "{stdout}");
    let mut pngs: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    pngs.sort();
    assert_eq!(pngs.len(), 3, "{pngs:?}");
    let mut images = Vec::new();
    for p in &pngs {
        let reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()))
            .read_info()
            .unwrap();
        assert_eq!((reader.info().width, reader.info().height), (512, 512));
        images.push(std::fs::read(p).unwrap());
    }
    assert_ne!(
        images[0], images[1],
        "different prompts give different pictures"
    );
    // Progress was shown (one line per state change when not on a terminal).
    assert!(stderr.contains("running on demo-gpu"), "{stderr}");
    // An orderly end (the workers say goodbye, the broker stops) warns of nothing.
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}
