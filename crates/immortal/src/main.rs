//! The `immortal` command: see `immortal --help`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use immortal::cli;

/// Keeps SSH sessions and port-forwards alive across laptop sleep and network changes.
///
/// `immortal ssh HOST` is ssh that survives the network going away, with nothing set up but
/// ssh (the `immortal` binary on HOST: `immortal ssh --install HOST` copies it there).
/// `immortal config-ssh HOST` makes plain `ssh HOST`, scp, rsync and git do the same.
/// For an agent with a reachable port, run `immortal serve` there and use
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
    Ssh(cli::ssh::SshArgs),
    ConfigSsh(cli::config_ssh::ConfigSshArgs),
    Serve(cli::serve::ServeArgs),
    Connect(cli::connect::ConnectArgs),
    Forward(cli::forward::ForwardArgs),
    Ls(cli::ls::LsArgs),
    Rm(cli::rm::RmArgs),
    Demo(cli::demo::DemoArgs),
    Relay(cli::relay::RelayArgs),
    Agent(cli::agent::AgentArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging();
    // The commands that need no runtime: `ssh` becomes ssh, `relay` is plain blocking copies.
    let command = match cli.command {
        Command::Ssh(args) => return exit(cli::ssh::run(args)),
        Command::ConfigSsh(args) => return exit(cli::config_ssh::run(args)),
        Command::Relay(args) => return exit(cli::relay::run(args)),
        command => command,
    };
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
        match command {
            Command::Serve(args) => cli::serve::run(args).await,
            Command::Connect(args) => cli::connect::run(args).await,
            Command::Forward(args) => cli::forward::run(args).await,
            Command::Ls(args) => cli::ls::run(args).await,
            Command::Rm(args) => cli::rm::run(args).await,
            Command::Demo(args) => cli::demo::run(args).await,
            Command::Agent(args) => cli::agent::run(args).await,
            // Handled above, before the runtime.
            Command::Ssh(_) | Command::ConfigSsh(_) | Command::Relay(_) => Ok(()),
        }
    });
    exit(result)
}

fn exit(result: Result<(), cli::CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("immortal: {err}");
            err.exit_code()
        }
    }
}
