//! `kiln keys generate`: CURVE key pairs for the broker, workers and clients.

use std::path::Path;

use kiln_protocol::transport::CurveKeyPair;

/// Writes `<base>.key` (public) and `<base>.key_secret` (mode 0600) and prints the
/// public key, which goes into the peers' configs (docs/security.md).
pub fn generate(base: &Path, json: bool) -> anyhow::Result<std::process::ExitCode> {
    let pair = CurveKeyPair::generate()?;
    pair.write_certificates(base)?;
    let public = base.with_extension("key");
    let secret = base.with_extension("key_secret");
    if json {
        crate::print_json(&serde_json::json!({
            "public_key": pair.public,
            "public_file": public,
            "secret_file": secret,
        }));
    } else {
        println!("public key: {}", pair.public);
        println!(
            "wrote {} and {} (mode 0600)",
            public.display(),
            secret.display()
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}
