//! `kiln man`: man pages generated from the clap definitions, so they cannot
//! disagree with `--help`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

/// Writes `kiln.1` and `kiln-<command>.1` for every (nested) subcommand into `dir`.
pub fn write(cmd: clap::Command, dir: &Path) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    page(cmd, "kiln", dir, &mut written)?;
    for f in &written {
        println!("{}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn page(
    cmd: clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<std::path::PathBuf>,
) -> anyhow::Result<()> {
    // clap names are `&'static str`; a one-shot command can leak a few bytes.
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    let cmd = cmd.name(leaked).bin_name(name.replace('-', " "));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        page(
            sub.clone(),
            &format!("{name}-{}", sub.get_name()),
            dir,
            written,
        )?;
    }
    Ok(())
}
