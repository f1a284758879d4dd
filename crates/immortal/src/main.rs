//! The `immortal` command: see `immortal --help`.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
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
    Completions(Completions),
    Man(Man),
}

/// Print a shell completion script to stdout.
///
/// Example: immortal completions bash > ~/.local/share/bash-completion/completions/immortal
#[derive(clap::Args)]
struct Completions {
    /// The shell to complete in.
    shell: clap_complete::Shell,
}

/// Print the manual page (roff) to stdout.
///
/// Example: immortal man > ~/.local/share/man/man1/immortal.1 && man immortal
#[derive(clap::Args)]
struct Man {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Completions(Completions { shell }) => {
            let mut command = Cli::command();
            // Into memory first (writing to a closed pipe would panic inside clap_complete).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut command, "immortal", &mut script);
            return print(&script, "the completion script");
        }
        Command::Man(Man {}) => {
            let mut page = Vec::new();
            if let Err(err) = clap_mangen::Man::new(Cli::command()).render(&mut page) {
                eprintln!("immortal: cannot render the manual page: {err}");
                return ExitCode::FAILURE;
            }
            return print(&page, "the manual page");
        }
        _ => {}
    }
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
            Command::Ssh(_)
            | Command::ConfigSsh(_)
            | Command::Relay(_)
            | Command::Completions(_)
            | Command::Man(_) => Ok(()),
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

/// Writes `bytes` to stdout; a reader that went away early (`| head`) is no failure.
fn print(bytes: &[u8], what: &str) -> ExitCode {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("immortal: cannot write {what}: {err}");
            ExitCode::FAILURE
        }
    }
}
