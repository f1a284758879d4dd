//! `immortal config-ssh HOST...`: a marked block at the top of `~/.ssh/config` that makes
//! plain `ssh HOST` (and scp, rsync, git, editors' remote features) ride immortal.
//!
//! The block, rewritten whole on every change and left byte for byte as it was otherwise:
//!
//! ```text
//! # >>> immortal config-ssh >>>
//! # Written by `immortal config-ssh`; edits inside are lost. Undo: immortal config-ssh --remove
//! Match originalhost web1,db !exec "printenv IMMORTAL_CARRIER"
//!     ProxyCommand /usr/local/bin/immortal connect --stdio --via-ssh %r@%n --ssh-arg=-p%p --sshd %p
//! Match all
//! # <<< immortal config-ssh <<<
//! ```
//!
//! It goes first in the file, because ssh keeps the first value it reads for an option. The
//! `exec` condition keeps it from applying to immortal's own carriers, which run with
//! `IMMORTAL_CARRIER=1`: they reach the host as the rest of the file says (a `ProxyJump` there
//! is kept). `printenv` runs the same in every login shell (a `$VARIABLE` test would fail in
//! csh when unset). The carriers log in as the user and on the port of the ssh they serve
//! (`%r`, `%p`: what its command line or the file says). `Match all` ends the block, so global
//! settings that follow still apply to every host.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clap::Args;

use super::CliError;

/// The first line of the block.
pub const BEGIN: &str = "# >>> immortal config-ssh >>>";
/// The last line of the block.
pub const END: &str = "# <<< immortal config-ssh <<<";
const MATCH_PREFIX: &str = "Match originalhost ";

/// Make plain `ssh HOST` ride immortal, by a marked block in ~/.ssh/config.
///
/// Adds HOSTs (as you type them after ssh: names, aliases, patterns like *.example.org) to a
/// block at the top of ~/.ssh/config that sets immortal as their ProxyCommand; with --remove,
/// takes them out (all of them, and the block, when none is named). Lines outside the block are
/// never changed; the file as it was is kept in ~/.ssh/config.immortal.bak. Running it again
/// with the same hosts changes nothing.
#[derive(Debug, Clone, Args)]
pub struct ConfigSshArgs {
    /// Remove the HOSTs (or, with none named, the whole block) instead of adding them.
    #[arg(long)]
    pub remove: bool,
    /// The ssh configuration file (default: ~/.ssh/config).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Hosts, as given to ssh.
    pub hosts: Vec<String>,
}

/// What is wrong with a configuration file or a host name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigSshError {
    /// A host name that ssh's configuration cannot hold in a pattern list.
    #[error("{0:?} cannot be a host in an ssh pattern list (no spaces, commas, quotes, or a leading `!`)")]
    BadHost(String),
    /// The file's block is not whole: a begin line without an end line, or two blocks.
    #[error("line {line}: {problem}; fix the block by hand (or delete it) and run again")]
    BrokenBlock {
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        problem: &'static str,
    },
}

/// Where the block is in a file, and the hosts it names.
struct Found {
    /// The byte range of its lines, newlines included.
    range: std::ops::Range<usize>,
    hosts: Vec<String>,
}

/// The block in `text`, if there is one.
fn find_block(text: &str) -> Result<Option<Found>, ConfigSshError> {
    let mut start = None;
    let mut found = None;
    let mut hosts = Vec::new();
    let mut offset = 0;
    for (number, line) in text.split_inclusive('\n').enumerate() {
        let content = line.trim_end_matches(['\n', '\r']);
        let here = offset;
        offset += line.len();
        if content == BEGIN {
            if start.is_some() || found.is_some() {
                return Err(ConfigSshError::BrokenBlock {
                    line: number + 1,
                    problem: "a second immortal block begins here",
                });
            }
            start = Some((here, number));
        } else if content == END {
            let Some((begin, _)) = start.take() else {
                return Err(ConfigSshError::BrokenBlock {
                    line: number + 1,
                    problem: "the immortal block ends here but never began",
                });
            };
            found = Some(begin..offset);
        } else if start.is_some() {
            if let Some(list) = content.strip_prefix(MATCH_PREFIX) {
                let list = list.split_whitespace().next().unwrap_or_default();
                hosts.extend(list.split(',').filter(|h| !h.is_empty()).map(String::from));
            }
        }
    }
    if let Some((_, number)) = start {
        return Err(ConfigSshError::BrokenBlock {
            line: number + 1,
            problem: "the immortal block begins here but never ends",
        });
    }
    Ok(found.map(|range| Found { range, hosts }))
}

/// The block for `hosts` (not empty), running `exe`.
fn render(hosts: &[String], exe: &str) -> String {
    let exe = shlex::try_quote(exe)
        .map(|q| q.into_owned())
        .unwrap_or_else(|_| exe.to_owned())
        .replace('%', "%%");
    format!(
        "{BEGIN}\n\
         # Written by `immortal config-ssh`; edits inside are lost. Undo: immortal config-ssh --remove\n\
         {}    \
         ProxyCommand {exe} connect --stdio --via-ssh %r@%n --ssh-arg=-p%p --sshd %p\n\
         Match all\n\
         {END}\n",
        match_line(hosts)
    )
}

/// The block's `Match` line for `hosts`: those hosts, and not inside a carrier.
fn match_line(hosts: &[String]) -> String {
    format!(
        "{MATCH_PREFIX}{} !exec \"printenv IMMORTAL_CARRIER\"\n",
        hosts.join(",")
    )
}

fn check_host(host: &str) -> Result<(), ConfigSshError> {
    let bad = host.is_empty()
        || host.starts_with('!')
        || host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ',' | '"' | '\'' | '#'));
    if bad {
        Err(ConfigSshError::BadHost(host.to_owned()))
    } else {
        Ok(())
    }
}

/// `text` with `hosts` added to the block (which is created at the top if missing). Hosts
/// already there are not repeated; the rest of the text is unchanged.
///
/// ```
/// use immortal::cli::config_ssh::{add_hosts, remove_hosts};
///
/// let original = "Host *\n    ServerAliveInterval 30\n";
/// let with = add_hosts(original, &["web".into()], "/bin/immortal").unwrap();
/// assert!(with.ends_with(original));
/// assert_eq!(add_hosts(&with, &["web".into()], "/bin/immortal").unwrap(), with);
/// assert_eq!(remove_hosts(&with, &[]).unwrap(), original);
/// ```
///
/// # Errors
/// A bad host name, or a broken block in `text`.
pub fn add_hosts(text: &str, hosts: &[String], exe: &str) -> Result<String, ConfigSshError> {
    for host in hosts {
        check_host(host)?;
    }
    let (range, mut all) = match find_block(text)? {
        Some(found) => (found.range, found.hosts),
        None => (0..0, Vec::new()),
    };
    for host in hosts {
        if !all.contains(host) {
            all.push(host.clone());
        }
    }
    if all.is_empty() {
        return Ok(text.to_owned());
    }
    Ok(splice(text, range, &render(&all, exe)))
}

/// `text` with `hosts` taken out of the block, or the whole block when `hosts` is empty or
/// none is left; the rest of the text is unchanged. Hosts not in the block are ignored.
///
/// # Errors
/// A broken block in `text`.
pub fn remove_hosts(text: &str, hosts: &[String]) -> Result<String, ConfigSshError> {
    let Some(Found {
        range,
        hosts: existing,
    }) = find_block(text)?
    else {
        return Ok(text.to_owned());
    };
    let left: Vec<String> = existing
        .into_iter()
        .filter(|host| !hosts.is_empty() && !hosts.contains(host))
        .collect();
    if left.is_empty() {
        return Ok(splice(text, range, ""));
    }
    // Keep the block's own ProxyCommand line (and so its program path) as it is.
    let block = &text[range.clone()];
    let mut rewritten = String::with_capacity(block.len());
    for line in block.split_inclusive('\n') {
        if line.starts_with(MATCH_PREFIX) {
            rewritten.push_str(&match_line(&left));
        } else {
            rewritten.push_str(line);
        }
    }
    Ok(splice(text, range, &rewritten))
}

fn splice(text: &str, range: std::ops::Range<usize>, with: &str) -> String {
    let mut out = String::with_capacity(text.len() + with.len());
    out.push_str(&text[..range.start]);
    out.push_str(with);
    out.push_str(&text[range.end..]);
    out
}

/// Edits the file as asked.
pub fn run(args: ConfigSshArgs) -> Result<(), CliError> {
    if args.hosts.is_empty() && !args.remove {
        return Err(CliError::Other(
            "name at least one host: immortal config-ssh HOST... (or --remove)".into(),
        ));
    }
    let path = match args.config {
        Some(path) => path,
        None => dirs::home_dir()
            .ok_or_else(|| CliError::Other("no home directory; pass --config PATH".into()))?
            .join(".ssh")
            .join("config"),
    };
    let io_error =
        |what: &str, err: io::Error| CliError::Other(format!("{what} {}: {err}", path.display()));
    let original = match fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => return Err(io_error("cannot read", err)),
    };
    let text = original.as_deref().unwrap_or_default();
    let updated = if args.remove {
        remove_hosts(text, &args.hosts)
    } else {
        let exe = std::env::current_exe()
            .map_err(|err| CliError::Other(format!("cannot find this program: {err}")))?;
        let exe = on_path(&exe, std::env::var_os("PATH").as_deref()).unwrap_or(exe);
        let exe = exe
            .to_str()
            .ok_or_else(|| CliError::Other(format!("{} is not valid text", exe.display())))?
            .to_owned();
        add_hosts(text, &args.hosts, &exe)
    }
    .map_err(|err| CliError::Other(format!("{}: {err}", path.display())))?;
    if updated == text {
        eprintln!(
            "immortal: {} already says so; nothing changed",
            path.display()
        );
        return Ok(());
    }
    let backup = path.with_file_name(match path.file_name() {
        Some(name) => format!("{}.immortal.bak", name.to_string_lossy()),
        None => "config.immortal.bak".into(),
    });
    if original.is_some() {
        fs::copy(&path, &backup).map_err(|err| io_error("cannot back up", err))?;
    }
    // A configuration that is a link (to a dotfiles repository, say) stays one: the file it
    // points to is what changes.
    let target = if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        fs::canonicalize(&path).map_err(|err| io_error("cannot follow the link", err))?
    } else {
        path.clone()
    };
    write_atomically(&target, updated.as_bytes()).map_err(|err| io_error("cannot write", err))?;
    let verb = if args.remove { "removed" } else { "set up" };
    let which = if args.hosts.is_empty() {
        "every host".to_string()
    } else {
        args.hosts.join(", ")
    };
    let kept = if original.is_some() {
        format!("; the previous file is {}", backup.display())
    } else {
        String::new()
    };
    eprintln!("immortal: {} {verb} for {which}{kept}", path.display());
    Ok(())
}

/// The first `immortal` on `path_var` if it is `exe` (the same file, perhaps through a link),
/// as found there: a link that a package manager repoints at each upgrade (`~/.nix-profile/bin`,
/// Homebrew's `bin`) keeps working after the version `exe` resolves to is gone.
fn on_path(exe: &Path, path_var: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    let name = exe.file_name()?;
    let real = fs::canonicalize(exe).ok()?;
    let found = std::env::split_paths(path_var?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())?;
    (found.is_absolute() && fs::canonicalize(&found).ok()? == real).then_some(found)
}

/// Writes `path` through a temporary file in the same directory renamed over it, keeping its
/// permissions (0600 for a new file; its directory 0700 if created).
fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.as_os_str().is_empty() && !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mode = fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o600);
    let temporary = path.with_extension("immortal.tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)?;
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXE: &str = "/usr/local/bin/immortal";

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_block_goes_first_and_says_what_it_does() {
        let original = "# mine\nHost db\n  User me\n";
        let text = add_hosts(original, &hosts(&["web", "db"]), EXE).unwrap();
        assert_eq!(
            text,
            format!(
                "{BEGIN}\n# Written by `immortal config-ssh`; edits inside are lost. Undo: immortal \
                 config-ssh --remove\nMatch originalhost web,db !exec \"printenv IMMORTAL_CARRIER\"\n    \
                 ProxyCommand {EXE} connect --stdio --via-ssh %r@%n --ssh-arg=-p%p --sshd %p\nMatch all\n{END}\n{original}"
            )
        );
        assert_eq!(
            add_hosts("", &hosts(&["a"]), EXE).unwrap().lines().count(),
            6
        );
    }

    #[test]
    fn adding_is_idempotent_and_keeps_the_blocks_place() {
        let before = "Host x\n  Port 2\n";
        let after = "\nHost *\n  ServerAliveInterval 30\n";
        let block = render(&hosts(&["a"]), EXE);
        let text = format!("{before}{block}{after}");
        assert_eq!(add_hosts(&text, &hosts(&["a"]), EXE).unwrap(), text);
        let more = add_hosts(&text, &hosts(&["b", "a"]), EXE).unwrap();
        assert_eq!(
            more,
            format!("{before}{}{after}", render(&hosts(&["a", "b"]), EXE))
        );
    }

    #[test]
    fn removing_restores_the_original_bytes() {
        for original in [
            "",
            "Host a\n",
            "no newline at the end",
            "Host a\r\n  User b\r\n",
        ] {
            let added = add_hosts(original, &hosts(&["h1", "h2"]), EXE).unwrap();
            let one = remove_hosts(&added, &hosts(&["h1"])).unwrap();
            assert!(one.contains("Match originalhost h2 !exec"), "{one}");
            assert!(one.ends_with(original));
            assert_eq!(remove_hosts(&one, &hosts(&["h2"])).unwrap(), original);
            assert_eq!(remove_hosts(&added, &[]).unwrap(), original);
            assert_eq!(remove_hosts(original, &[]).unwrap(), original);
        }
    }

    #[test]
    fn the_program_is_named_as_found_on_the_path_when_it_is_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store/v1");
        let bin = dir.path().join("profile/bin");
        fs::create_dir_all(&store).unwrap();
        fs::create_dir_all(&bin).unwrap();
        let real = store.join("immortal");
        fs::write(&real, "").unwrap();
        std::os::unix::fs::symlink(&real, bin.join("immortal")).unwrap();
        let other = dir.path().join("other");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("immortal"), "").unwrap();
        let path = |dirs: &[&Path]| std::env::join_paths(dirs).unwrap();
        assert_eq!(
            on_path(&real, Some(&path(&[&bin]))),
            Some(bin.join("immortal"))
        );
        // The first on the PATH is another program: not that one.
        assert_eq!(on_path(&real, Some(&path(&[&other, &bin]))), None);
        assert_eq!(on_path(&real, None), None);
    }

    #[test]
    fn the_program_path_is_quoted_and_escaped_for_ssh() {
        let block = render(&hosts(&["a"]), "/opt/my tools/immortal%1");
        assert!(
            block.contains("ProxyCommand '/opt/my tools/immortal%%1' connect"),
            "{block}"
        );
    }

    #[test]
    fn bad_hosts_and_broken_blocks_are_refused_and_change_nothing() {
        for bad in ["", "a b", "a,b", "!a", "a\"", "a#b"] {
            assert_eq!(
                add_hosts("", &hosts(&[bad]), EXE),
                Err(ConfigSshError::BadHost(bad.into()))
            );
        }
        let unended = format!("Host a\n{BEGIN}\nMatch originalhost x exec \"\"\n");
        assert!(matches!(
            add_hosts(&unended, &hosts(&["b"]), EXE),
            Err(ConfigSshError::BrokenBlock { line: 2, .. })
        ));
        let unbegun = format!("{END}\n");
        assert!(remove_hosts(&unbegun, &[]).is_err());
        let block = render(&hosts(&["a"]), EXE);
        let twice = format!("{block}{block}");
        assert!(matches!(
            add_hosts(&twice, &hosts(&["b"]), EXE),
            Err(ConfigSshError::BrokenBlock { .. })
        ));
    }
}
