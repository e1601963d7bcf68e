//! `--generate man|complete-bash|complete-zsh|complete-fish`: a tool's man page (roff) or shell
//! completion script, written to stdout and made from the tool's clap definition, so the two can
//! never disagree with `--help`. `cargo xtask install` puts them where man and the shells look.

use std::io::Write;

/// What `--generate` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Generate {
    /// The man page (roff), for `man -l -` or share/man/man1/TOOL.1.
    Man,
    /// bash completions, for share/bash-completion/completions/TOOL.
    CompleteBash,
    /// zsh completions, for share/zsh/site-functions/_TOOL.
    CompleteZsh,
    /// fish completions, for share/fish/vendor_completions.d/TOOL.fish.
    CompleteFish,
}

pub(crate) const ARG_ID: &str = "ovl_cli_generate";

/// `cmd` with the `--generate` option. It is exclusive: a tool's required arguments are not
/// asked for when it is given.
pub(crate) fn add_arg(cmd: clap::Command) -> clap::Command {
    cmd.arg(
        clap::Arg::new(ARG_ID)
            .long("generate")
            .value_name("KIND")
            .value_parser(clap::builder::EnumValueParser::<Generate>::new())
            .exclusive(true)
            .help("Write the man page or a shell completion script to stdout, and exit"),
    )
}

/// Write `kind` for the tool `cmd` (the whole command, as [`crate::command`] builds it).
pub(crate) fn write(
    mut cmd: clap::Command,
    kind: Generate,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    use clap_complete::Shell;
    let shell = match kind {
        Generate::Man => return clap_mangen::Man::new(cmd).render(out),
        Generate::CompleteBash => Shell::Bash,
        Generate::CompleteZsh => Shell::Zsh,
        Generate::CompleteFish => Shell::Fish,
    };
    let name = cmd.get_name().to_string();
    // clap_complete panics on a write error; write to memory, then out.
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut buf);
    out.write_all(&buf)?;
    out.flush()
}
