//! `immortal ssh`: the user's ssh, with a ProxyCommand that carries the connection as an
//! immortal stream over ssh carriers; and `--install`, which puts this binary on the remote
//! host first.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use clap::Args;

use super::CliError;
use crate::client::{SshCarrier, SshCommand};

/// ssh, surviving network loss, sleep and roaming, with nothing set up but ssh.
///
/// Runs your ssh (or $IMMORTAL_SSH_COMMAND) with a ProxyCommand that carries the connection
/// as an immortal stream: each time the network comes back, a fresh ssh (the carrier) logs in
/// and resumes it, so the session itself never notices. The remote host needs the `immortal`
/// binary (on its PATH, in ~/.local/bin, or named by --remote-command); nothing else: no
/// daemon, no open port, no token. `--install` copies this binary there first.
///
/// ssh's options go to both the session and the carriers (-p, -i, -l, -o, -F, -4/-6, -v, ...),
/// except those that belong to the session alone (-L, -R, -D, -A, -X, -Y, -t, -T, -N, -f, -n,
/// -e, -C, -W, -M, -S, -O, -E, -G, -V) and the ways to reach the host (-J, -o ProxyJump,
/// -o ProxyCommand), which the carriers take. The exit status is ssh's.
///
/// Example: immortal ssh -p 2222 me@example.org tmux attach
#[derive(Debug, Clone, Args)]
#[command(disable_help_flag = true, disable_version_flag = true)]
pub struct SshArgs {
    /// Show this help.
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
    /// ssh's options, the destination, and the command to run there, as for ssh. Also
    /// accepted before the destination: --remote-command PATH (the immortal command on the
    /// remote host) and --install (copy this binary to ~/.local/bin/immortal there first, if
    /// the remote's OS and architecture match).
    #[arg(
        value_name = "[--install] [--remote-command PATH] [SSH_OPTIONS] DEST [COMMAND]",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true
    )]
    pub args: Vec<String>,
}

/// ssh's options that take an argument (ssh(1), OpenSSH 9).
const WITH_ARGUMENT: &str = "BbcDEeFIiJLlmOoPpQRSWw";
/// ssh's options without one.
const FLAGS: &str = "1246AaCfGgKkMNnqsTtVvXxYy";
/// Options for the session alone: forwards, terminal, escape, multiplexing, modes that do not
/// connect.
const SESSION_ONLY: &str = "ADEGLMNORSTVWXYaCefgnstwxy";
/// `-o` settings (lower case) that say how to reach the host: the carriers' business.
const REACH_SETTINGS: &[&str] = &["proxycommand", "proxyjump"];

/// An `immortal ssh` command line, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshLine {
    /// `--install` was given.
    pub install: bool,
    /// `--remote-command`.
    pub remote_command: Option<String>,
    /// Options for the outer ssh (the session).
    pub session: Vec<String>,
    /// Options for the carriers.
    pub carrier: Vec<String>,
    /// The destination (empty for a query that connects nowhere: `-V`, `-Q`).
    pub dest: String,
    /// The remote command and its arguments, if any.
    pub command: Vec<String>,
}

impl SshLine {
    /// Sorts `args` (everything after `immortal ssh`) the way ssh parses them: options, the
    /// destination, more options, then the command.
    ///
    /// ```
    /// use immortal::cli::ssh::SshLine;
    ///
    /// let args = ["-p", "2222", "-L8080:localhost:80", "-J", "bastion", "me@host", "uptime"];
    /// let line = SshLine::parse(args.map(String::from).to_vec()).unwrap();
    /// assert_eq!(line.dest, "me@host");
    /// assert_eq!(line.session, ["-p", "2222", "-L", "8080:localhost:80"]);
    /// assert_eq!(line.carrier, ["-p", "2222", "-J", "bastion"]);
    /// assert_eq!(line.command, ["uptime"]);
    /// ```
    ///
    /// # Errors
    /// A sentence for an unknown option, a missing argument or a missing destination.
    pub fn parse(args: Vec<String>) -> Result<SshLine, String> {
        let mut line = SshLine::default();
        let mut dest = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if dest.is_some() && !arg.starts_with('-') {
                line.command.push(arg);
                line.command.extend(args.by_ref());
                break;
            }
            if arg == "--" {
                if dest.is_none() {
                    dest = args.next();
                }
                line.command.extend(args.by_ref());
                break;
            }
            if arg == "--install" {
                line.install = true;
                continue;
            }
            if let Some(value) = arg.strip_prefix("--remote-command") {
                line.remote_command = Some(match value.strip_prefix('=') {
                    Some(value) => value.to_owned(),
                    None if value.is_empty() => args
                        .next()
                        .ok_or("--remote-command needs the remote immortal's path")?,
                    None => return Err(format!("unknown option {arg:?}")),
                });
                continue;
            }
            if arg.starts_with("--") {
                return Err(format!("unknown option {arg:?}"));
            }
            let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.is_empty()) else {
                dest = Some(arg);
                continue;
            };
            // A cluster of flags, possibly ending in one option with its argument attached
            // (-At, -p2222, -AL8080:h:80) or following (-p 2222).
            for (i, c) in cluster.char_indices() {
                if FLAGS.contains(c) {
                    line.add(c, None);
                    continue;
                }
                if !WITH_ARGUMENT.contains(c) {
                    return Err(format!("unknown ssh option -{c}"));
                }
                let attached = &cluster[i + c.len_utf8()..];
                let value = if attached.is_empty() {
                    args.next()
                        .ok_or_else(|| format!("ssh option -{c} needs an argument"))?
                } else {
                    attached.to_owned()
                };
                line.add(c, Some(value));
                break;
            }
        }
        let Some(dest) = dest else {
            // `ssh -V` and `ssh -Q WHAT` answer and connect nowhere: no destination needed.
            if line.session.iter().any(|word| word == "-V" || word == "-Q") {
                return Ok(line);
            }
            return Err("no destination: immortal ssh [OPTIONS] DEST [COMMAND]".into());
        };
        line.dest = dest;
        if line.dest.starts_with('-') {
            return Err(format!("{:?} is not a destination", line.dest));
        }
        Ok(line)
    }

    /// Files option `-c` (with `value` if it takes one) for the session, the carriers or both.
    fn add(&mut self, c: char, value: Option<String>) {
        let words = || {
            let mut words = vec![format!("-{c}")];
            words.extend(value.clone());
            words
        };
        let reach = match (c, &value) {
            ('J', _) => true,
            ('o', Some(setting)) => {
                let name = setting
                    .split(|c: char| c == '=' || c.is_whitespace())
                    .next()
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                REACH_SETTINGS.contains(&name.as_str())
            }
            _ => false,
        };
        if reach {
            self.carrier.extend(words());
        } else if SESSION_ONLY.contains(c) {
            self.session.extend(words());
        } else {
            self.session.extend(words());
            self.carrier.extend(words());
        }
    }

    /// The destination and the command, as the outer ssh takes them: a command whose first
    /// word starts with `-` follows a `--`, so that ssh does not read it as an option.
    ///
    /// ```
    /// use immortal::cli::ssh::SshLine;
    ///
    /// let line = SshLine::parse(["host", "--", "--version"].map(String::from).to_vec()).unwrap();
    /// assert_eq!(line.dest_and_command(), ["host", "--", "--version"]);
    /// let line = SshLine::parse(["host", "uptime"].map(String::from).to_vec()).unwrap();
    /// assert_eq!(line.dest_and_command(), ["host", "uptime"]);
    /// ```
    pub fn dest_and_command(&self) -> Vec<String> {
        let mut words = vec![self.dest.clone()];
        if self
            .command
            .first()
            .is_some_and(|word| word.starts_with('-'))
        {
            words.push("--".into());
        }
        words.extend(self.command.iter().cloned());
        words
    }

    /// The ProxyCommand that carries the session: `exe connect --stdio --via-ssh DEST --sshd ... %p`,
    /// each word quoted for the shell ssh runs it with, and `%` escaped from ssh's expansion.
    ///
    /// # Errors
    /// A word that cannot be quoted (it contains a NUL byte).
    pub fn proxy_command(&self, exe: &str) -> Result<String, String> {
        let mut words: Vec<String> = vec![
            exe.into(),
            "connect".into(),
            "--stdio".into(),
            "--via-ssh".into(),
            self.dest.clone(),
            "--sshd".into(),
        ];
        if let Some(remote) = &self.remote_command {
            words.push("--remote-command".into());
            words.push(remote.clone());
        }
        for arg in &self.carrier {
            words.push(format!("--ssh-arg={arg}"));
        }
        let mut quoted = Vec::with_capacity(words.len() + 1);
        for word in &words {
            let word = shlex::try_quote(word)
                .map_err(|err| format!("cannot pass {word:?} to the ProxyCommand: {err}"))?;
            quoted.push(word.replace('%', "%%"));
        }
        quoted.push("%p".into());
        Ok(quoted.join(" "))
    }
}

/// Installs if asked, then becomes the user's ssh (the process is replaced, so ssh's exit
/// status is the status).
pub fn run(args: SshArgs) -> Result<(), CliError> {
    let line = SshLine::parse(args.args).map_err(CliError::Other)?;
    let ssh = SshCommand::from_env().map_err(|err| CliError::Other(err.to_string()))?;
    if line.dest.is_empty() {
        // A query (-V, -Q): ssh answers it.
        let err = ssh.command().args(&line.session).exec();
        return Err(CliError::Other(format!(
            "cannot run {}: {err}",
            ssh.program()
        )));
    }
    let exe = std::env::current_exe()
        .map_err(|err| CliError::Other(format!("cannot find this program: {err}")))?;
    if line.install {
        let carrier = SshCarrier::new(ssh.clone(), line.dest.clone(), None)
            .options(line.carrier.iter().cloned());
        install(&carrier, &exe)?;
    }
    let exe = exe
        .to_str()
        .ok_or_else(|| CliError::Other(format!("{} is not valid text", exe.display())))?;
    let proxy_command = line.proxy_command(exe).map_err(CliError::Other)?;
    let mut outer = ssh.command();
    outer
        .arg("-o")
        .arg(format!("ProxyCommand={proxy_command}"))
        .args(&line.session)
        .args(line.dest_and_command());
    let err = outer.exec();
    Err(CliError::Other(format!(
        "cannot run {}: {err}",
        ssh.program()
    )))
}

/// Where `--install` puts the binary, for the remote shell (which expands `~`).
const INSTALL_PATH: &str = "~/.local/bin/immortal";

/// Copies `exe` to [`INSTALL_PATH`] on the carrier's host if its OS and architecture are this
/// binary's, and proves it starts there.
fn install(carrier: &SshCarrier, exe: &std::path::Path) -> Result<(), CliError> {
    let host = carrier.dest();
    let failed = |what: String| CliError::Other(format!("--install: {what}"));
    let uname = carrier
        .remote("uname -sm")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|err| failed(format!("cannot run ssh: {err}")))?;
    if !uname.status.success() {
        return Err(failed(format!(
            "`uname -sm` on {host} failed ({}); nothing was copied",
            uname.status
        )));
    }
    let uname = String::from_utf8_lossy(&uname.stdout);
    let remote = platform(uname.trim()).ok_or_else(|| {
        failed(format!(
            "{host} says {:?}, not an OS and machine",
            uname.trim()
        ))
    })?;
    let local = (std::env::consts::OS, std::env::consts::ARCH);
    if remote != local {
        return Err(failed(format!(
            "{host} runs {}/{}, this binary is for {}/{}; nothing was copied. Build or \
             download immortal for {host} and put it on its PATH",
            remote.0, remote.1, local.0, local.1
        )));
    }
    let binary = std::fs::read(exe)
        .map_err(|err| failed(format!("cannot read {}: {err}", exe.display())))?;
    // Written aside, proved to start, then moved into place: a binary that does not run
    // there (an older C library, say) replaces nothing.
    let script = format!(
        "sh -c 'set -e; mkdir -p ~/.local/bin; new={INSTALL_PATH}.new; cat > \"$new\"; \
         chmod 755 \"$new\"; if \"$new\" --version; then mv -f \"$new\" {INSTALL_PATH}; \
         else rm -f \"$new\"; exit 3; fi'"
    );
    let mut copy = carrier
        .remote(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| failed(format!("cannot run ssh: {err}")))?;
    let written = copy
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(&binary))
        .unwrap_or(Ok(()));
    let output = copy
        .wait_with_output()
        .map_err(|err| failed(format!("ssh failed: {err}")))?;
    let said = String::from_utf8_lossy(&output.stderr);
    let said = said.trim();
    match output.status.code() {
        Some(0) if written.is_ok() => {
            let version = String::from_utf8_lossy(&output.stdout);
            eprintln!(
                "immortal: installed {} as {INSTALL_PATH} on {host}",
                version.trim()
            );
            Ok(())
        }
        Some(3) => Err(failed(format!(
            "the copied binary does not start on {host} ({said}); it was removed, nothing was \
             installed"
        ))),
        _ => Err(failed(format!(
            "copying to {host} failed ({}): {said}",
            output.status
        ))),
    }
}

/// `(std::env::consts::OS, std::env::consts::ARCH)` for the output of `uname -sm`.
fn platform(uname: &str) -> Option<(&'static str, &'static str)> {
    let (system, machine) = uname.split_once(' ')?;
    let os = match system {
        "Linux" => "linux",
        "Darwin" => "macos",
        "FreeBSD" => "freebsd",
        "OpenBSD" => "openbsd",
        "NetBSD" => "netbsd",
        _ => return None,
    };
    let arch = match machine.trim() {
        "x86_64" | "amd64" => "x86_64",
        "aarch64" | "arm64" => "aarch64",
        "i386" | "i486" | "i586" | "i686" => "x86",
        "riscv64" => "riscv64",
        "ppc64le" => "powerpc64",
        "s390x" => "s390x",
        m if m.starts_with("armv") => "arm",
        _ => return None,
    };
    Some((os, arch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<SshLine, String> {
        SshLine::parse(args.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn options_go_where_they_belong() {
        let line = parse(&[
            "-4",
            "-i",
            "key",
            "-At",
            "-o",
            "ProxyJump=b",
            "-oUser=me",
            "-D",
            "1080",
            "-vv",
            "host",
            "ls",
            "-l",
        ])
        .unwrap();
        assert_eq!(line.dest, "host");
        assert_eq!(line.command, ["ls", "-l"]);
        assert_eq!(
            line.session,
            ["-4", "-i", "key", "-A", "-t", "-o", "User=me", "-D", "1080", "-v", "-v"]
        );
        assert_eq!(
            line.carrier,
            [
                "-4",
                "-i",
                "key",
                "-o",
                "ProxyJump=b",
                "-o",
                "User=me",
                "-v",
                "-v"
            ]
        );
    }

    #[test]
    fn options_after_the_destination_and_our_own_are_understood() {
        let line = parse(&[
            "--install",
            "--remote-command=/opt/immortal",
            "host",
            "-p",
            "22",
            "--",
            "echo",
            "-n",
        ])
        .unwrap();
        assert!(line.install);
        assert_eq!(line.remote_command.as_deref(), Some("/opt/immortal"));
        assert_eq!(line.dest, "host");
        assert_eq!(line.carrier, ["-p", "22"]);
        assert_eq!(line.command, ["echo", "-n"]);
        let line = parse(&["--remote-command", "x y", "-p2222", "h"]).unwrap();
        assert_eq!(line.remote_command.as_deref(), Some("x y"));
        assert_eq!(line.session, ["-p", "2222"]);
    }

    #[test]
    fn bad_lines_are_refused() {
        assert!(parse(&[]).unwrap_err().contains("no destination"));
        assert!(parse(&["-p"]).unwrap_err().contains("-p needs"));
        assert!(parse(&["-Z", "h"]).unwrap_err().contains("-Z"));
        assert!(parse(&["--frobnicate", "h"])
            .unwrap_err()
            .contains("frobnicate"));
        assert!(parse(&["--", "-h"])
            .unwrap_err()
            .contains("not a destination"));
        assert!(parse(&["-v"]).unwrap_err().contains("no destination"));
    }

    #[test]
    fn queries_need_no_destination() {
        for query in [&["-V"][..], &["-Q", "cipher"]] {
            let line = parse(query).unwrap();
            assert_eq!(line.dest, "");
            assert_eq!(line.session, query);
        }
    }

    #[test]
    fn the_proxy_command_quotes_and_escapes() {
        let line = parse(&["-o", "IdentityFile=~/my key%d", "-p", "2222", "me@h"]).unwrap();
        let command = line.proxy_command("/usr/bin/immortal").unwrap();
        assert_eq!(
            command,
            "/usr/bin/immortal connect --stdio --via-ssh me@h --sshd '--ssh-arg=-o' \
             '--ssh-arg=IdentityFile=~/my key%%d' '--ssh-arg=-p' '--ssh-arg=2222' %p"
        );
        // What ssh's %-expansion and the shell make of it is the original words.
        let expanded = command.replace("%%", "%").replace(" %p", " 22");
        let words = shlex::split(&expanded).unwrap();
        assert_eq!(words[7], "--ssh-arg=IdentityFile=~/my key%d");
    }

    #[test]
    fn uname_names_platforms() {
        assert_eq!(platform("Linux x86_64"), Some(("linux", "x86_64")));
        assert_eq!(platform("Darwin arm64"), Some(("macos", "aarch64")));
        assert_eq!(platform("Linux armv7l"), Some(("linux", "arm")));
        assert_eq!(platform("Plan9 386"), None);
        assert_eq!(platform("garbage"), None);
    }
}
