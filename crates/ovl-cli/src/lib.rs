//! ovl-cli: the command-line plumbing every ovl tool shares, so no `main.rs` carries a copy.
//!
//! Owns [`parse`] (clap parsing plus what every tool takes: `--generate
//! man|complete-bash|complete-zsh|complete-fish`, ripgrep's convention, and `--version` with
//! the git commit the binary was built from), and `progress` (bars on stderr, only on a
//! terminal). The libraries never draw: they count, and the tools show the counts here.

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

mod generate;
mod progress;

use std::ffi::OsString;

use clap::{CommandFactory, Parser};

pub use generate::Generate;
pub use progress::{Bar, CountingWriter, Unit, wanted as progress_wanted};

/// `0.1.0 (git 0123456789ab)`: the version every tool's `--version` prints.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("OVL_GIT_COMMIT"),
    ")"
);

pub use ovl_layer::error_chain;

/// The clap command of a tool as its users see it: its own definition plus the shared
/// `--generate` option and version.
pub fn command<T: CommandFactory>() -> clap::Command {
    generate::add_arg(T::command().version(VERSION))
}

/// Parse the process's arguments into `T`; `--generate KIND` writes that to stdout and exits,
/// as `--help` and `--version` do.
pub fn parse<T: Parser>() -> T {
    parse_from(std::env::args_os())
}

/// [`parse`] from the given arguments (the first is the program name).
pub fn parse_from<T: Parser, I: IntoIterator<Item = impl Into<OsString> + Clone>>(args: I) -> T {
    let cmd = command::<T>();
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    // `--generate` first, with nothing else asked for: an exclusive argument does not lift a
    // required group (ovl-squash's `--output | --in-place`).
    let probe = cmd.clone().ignore_errors(true).try_get_matches_from(&args);
    if let Some(kind) = probe.ok().and_then(|m| {
        m.try_get_one::<Generate>(generate::ARG_ID)
            .ok()
            .flatten()
            .copied()
    }) {
        let code = match generate::write(cmd, kind, &mut std::io::stdout().lock()) {
            Ok(()) => 0,
            // `ovl-import --generate man | head`: the reader went away, nothing to say.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
            Err(e) => {
                eprintln!("error: writing to stdout: {e}");
                1
            }
        };
        std::process::exit(code);
    }
    let matches = cmd.get_matches_from(args);
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut command::<T>()).exit())
}
