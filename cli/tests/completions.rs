//! Shell completions and man pages come from the clap definitions.

use std::process::Command;

use kiln_testkit::{bin, Scratch};

#[test]
fn completions_and_man_pages_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(bin("kiln"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        for word in ["submit", "gpu-info", "idempotency-key"] {
            assert!(text.contains(word), "{shell} completion lacks {word}");
        }
    }
    let s = Scratch::new();
    let out = Command::new(bin("kiln"))
        .args(["man", "--out"])
        .arg(s.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in ["kiln.1", "kiln-submit.1", "kiln-config-defaults.1"] {
        let text = std::fs::read_to_string(s.path().join(page)).unwrap();
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    let submit = std::fs::read_to_string(s.path().join("kiln-submit.1")).unwrap();
    assert!(submit.contains("priority"), "{submit}");
}
