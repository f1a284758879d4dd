//! The `immortal` command: see `immortal --help`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use immortal::cli;

/// Keeps SSH sessions and port-forwards alive across laptop sleep and network changes.
///
/// Run `immortal serve` on the remote host; on your laptop, use
/// `ssh -o ProxyCommand='immortal connect --stdio --server %h:7400 %p' HOST`, or
/// `immortal forward 127.0.0.1:5432:5432` for any other TCP service. `immortal demo` shows it
/// working with nothing set up.
#[derive(Parser)]
#[command(version, about, long_about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Serve(cli::serve::ServeArgs),
    Connect(cli::connect::ConnectArgs),
    Forward(cli::forward::ForwardArgs),
    Ls(cli::ls::LsArgs),
    Rm(cli::rm::RmArgs),
    Demo(cli::demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("immortal: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => cli::serve::run(args).await,
            Command::Connect(args) => cli::connect::run(args).await,
            Command::Forward(args) => cli::forward::run(args).await,
            Command::Ls(args) => cli::ls::run(args).await,
            Command::Rm(args) => cli::rm::run(args).await,
            Command::Demo(args) => cli::demo::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("immortal: {err}");
            err.exit_code()
        }
    }
}
