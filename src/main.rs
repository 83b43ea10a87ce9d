//! The `hybridstore` binary: `serve` (the default) runs the server from
//! `hybridstore-server`; the other subcommands are the operator CLI of
//! `hybridstore-cli`, which talks to a running server's admin API.

use std::process::ExitCode;

use hybridstore_cli::Command;

fn main() -> ExitCode {
    let cli = hybridstore_cli::parse();
    match cli.command {
        None | Some(Command::Serve) => hybridstore_server::run_from_env(),
        Some(command) => hybridstore_cli::run(command, cli.remote),
    }
}
