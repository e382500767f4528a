//! `quiesce __generate-assets DIR`: the man pages and shell completions, generated from this
//! command's own clap definition so that they always say what `--help` says. For packaging only
//! (`scripts/package` runs it after the release build); it is not part of the command line
//! (no subcommand, so `--help`, the pages and the completions do not show it).

use anyhow::Context;
use clap_complete::Shell;
use std::path::{Path, PathBuf};

const ARGUMENT: &str = "__generate-assets";

/// The directory of `quiesce __generate-assets DIR`, when that is the whole command line.
pub fn requested() -> Option<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next(), args.next()) {
        (Some(first), Some(dir), None) if first == ARGUMENT => Some(dir.into()),
        _ => None,
    }
}

/// Writes `DIR/man/quiesce.1`, one page per subcommand (`quiesce-snapshot-create.1`, …), and
/// `DIR/completions/{quiesce.bash,_quiesce,quiesce.fish}`.
pub fn generate(mut command: clap::Command, dir: &Path) -> anyhow::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    clap_mangen::generate_to(command.clone(), &man)
        .with_context(|| format!("writing the man pages into {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command, "quiesce", &completions).with_context(
            || {
                format!(
                    "writing the {shell} completions into {}",
                    completions.display()
                )
            },
        )?;
    }
    Ok(())
}
