//! The `ovl-unshare` command line: a thin shim over [`ovl_unshare::run`].

#![forbid(unsafe_code)]

use std::ffi::OsString;

use ovl_unshare::Where;

/// Run CMD (default: $SHELL) as root of the user namespace the ovl tools use: container 0 is
/// you, container 1..=65536 your subordinate ids (or only you, without any). The working
/// directory and the environment are kept and CMD's exit status is returned. Remove a rootless
/// box with `ovl-unshare rm -rf box`. Run as root, CMD runs as it is.
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Cli {
    /// The command and its arguments: everything after ovl-unshare's own options.
    #[arg(
        value_name = "CMD",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<OsString>,
}

fn main() {
    let cli: Cli = ovl_cli::parse();
    let result = ovl_unshare::choose().and_then(|place| {
        if let Where::Userns(plan) = &place {
            if !plan.maps.has_subordinate_ids() {
                eprintln!(
                    "ovl-unshare: warning: no subordinate ids for this user in /etc/subuid and \
                     /etc/subgid: only your own id is mapped"
                );
            }
        }
        ovl_unshare::run(&cli.command, &place)
    });
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ovl-unshare: error: {}", ovl_cli::error_chain(&e));
            std::process::exit(e.exit_code());
        }
    }
}
