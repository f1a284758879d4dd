//! `immortal config-ssh` on a temporary home: the block it writes is what ssh itself reads
//! (checked with `ssh -G`), it applies to the outer ssh and not to immortal's carriers, it is
//! idempotent, it keeps a backup, and `--remove` gives back the file byte for byte.

use std::path::Path;
use std::process::{Command, Output};

const IMMORTAL: &str = env!("CARGO_BIN_EXE_immortal");

const ORIGINAL: &str =
    "# my settings\nServerAliveInterval 30\n\nHost web\n    User deploy\n    ProxyJump bastion\n";

fn config_ssh(home: &Path, args: &[&str]) -> Output {
    let output = Command::new(IMMORTAL)
        .arg("config-ssh")
        .args(args)
        .env("HOME", home)
        .env("NO_COLOR", "1")
        .output()
        .expect("run immortal config-ssh");
    assert!(
        output.status.success(),
        "config-ssh {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// What ssh makes of the configuration for `host`: `ssh -G`, which connects nowhere.
fn resolved(config: &Path, host: &str, carrier: bool) -> String {
    let mut ssh = Command::new("ssh");
    ssh.arg("-G").arg("-F").arg(config).arg(host);
    if carrier {
        ssh.env("IMMORTAL_CARRIER", "1");
    } else {
        ssh.env_remove("IMMORTAL_CARRIER");
    }
    let output = ssh.output().expect("run ssh -G (install openssh-client)");
    assert!(
        output.status.success(),
        "ssh -G rejects the file: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn config_ssh_writes_a_block_ssh_reads_and_removes_it_exactly() {
    let home = tempfile::tempdir().unwrap();
    let ssh_dir = home.path().join(".ssh");
    std::fs::create_dir(&ssh_dir).unwrap();
    let config = ssh_dir.join("config");
    std::fs::write(&config, ORIGINAL).unwrap();

    config_ssh(home.path(), &["web", "db"]);
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(
        written.starts_with("# >>> immortal config-ssh >>>\n"),
        "{written}"
    );
    assert!(
        written.ends_with(ORIGINAL),
        "lines outside the block changed:\n{written}"
    );
    let backup = ssh_dir.join("config.immortal.bak");
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), ORIGINAL);

    // The outer ssh rides immortal; the carrier reaches the host as the file says.
    let outer = resolved(&config, "web", false);
    assert!(
        outer.contains("connect --stdio --via-ssh %r@%n --ssh-arg=-p%p --sshd %p"),
        "no ProxyCommand for web:\n{outer}"
    );
    assert!(outer.contains("serveraliveinterval 30"), "{outer}");
    let carrier = resolved(&config, "web", true);
    assert!(!carrier.contains("--via-ssh"), "{carrier}");
    assert!(carrier.contains("proxyjump bastion"), "{carrier}");
    assert!(carrier.contains("user deploy"), "{carrier}");
    let other = resolved(&config, "elsewhere", false);
    assert!(!other.contains("--via-ssh"), "{other}");

    // Again with the same hosts: nothing changes, not even the backup.
    let again = config_ssh(home.path(), &["db", "web"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing changed"));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), written);
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), ORIGINAL);

    config_ssh(home.path(), &["--remove", "web"]);
    let fewer = std::fs::read_to_string(&config).unwrap();
    assert!(!resolved(&config, "web", false).contains("--via-ssh"));
    assert!(
        resolved(&config, "db", false).contains("--via-ssh"),
        "{fewer}"
    );
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), written);

    config_ssh(home.path(), &["--remove"]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), ORIGINAL);
}

#[test]
fn config_ssh_creates_a_private_file_when_there_is_none() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    config_ssh(home.path(), &["box"]);
    let config = home.path().join(".ssh/config");
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(home.path().join(".ssh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    assert!(!home.path().join(".ssh/config.immortal.bak").exists());
    assert!(resolved(&config, "box", false).contains("--via-ssh"));
    config_ssh(home.path(), &["--remove", "box"]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "");
}

/// Plain `ssh -p 2222 alice@web` through the block starts its carriers as alice, on port 2222:
/// the ProxyCommand passes the user and port its ssh resolved. The carrier here is a script
/// that writes down its arguments and fails, so nothing is dialled.
#[test]
fn the_carriers_of_a_configured_host_log_in_as_its_ssh_user_and_port() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    config_ssh(home.path(), &["web"]);
    let log = home.path().join("carrier-args");
    let carrier = home.path().join("carrier.sh");
    std::fs::write(
        &carrier,
        format!("#!/bin/sh\necho \"$@\" >> '{}'\nexit 1\n", log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&carrier, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = Command::new("ssh")
        .arg("-F")
        .arg(home.path().join(".ssh/config"))
        .args(["-p", "2222", "alice@web", "true"])
        .env("HOME", home.path())
        .env("IMMORTAL_SSH_COMMAND", &carrier)
        .env_remove("IMMORTAL_CARRIER")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ssh (install openssh-client)");
    assert!(!output.status.success());
    let args = std::fs::read_to_string(&log).unwrap_or_else(|_| {
        panic!(
            "no carrier was started:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let first = args.lines().next().unwrap();
    let words: Vec<&str> = first.split_whitespace().collect();
    assert!(words.contains(&"-p2222"), "{first}");
    assert!(
        words.ends_with(&["alice@web", "immortal", "relay"]),
        "{first}"
    );
}

/// A `~/.ssh/config` that is a link (into a dotfiles repository) stays a link: the file it
/// points to gets the block, and loses it again on `--remove`.
#[test]
fn a_linked_config_stays_a_link_and_its_target_is_edited() {
    let home = tempfile::tempdir().unwrap();
    let dotfiles = home.path().join("dotfiles");
    std::fs::create_dir_all(&dotfiles).unwrap();
    std::fs::create_dir(home.path().join(".ssh")).unwrap();
    let target = dotfiles.join("ssh_config");
    std::fs::write(&target, ORIGINAL).unwrap();
    let link = home.path().join(".ssh/config");
    std::os::unix::fs::symlink("../dotfiles/ssh_config", &link).unwrap();

    config_ssh(home.path(), &["web"]);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let written = std::fs::read_to_string(&target).unwrap();
    assert!(written.contains("--via-ssh"), "{written}");
    assert!(written.ends_with(ORIGINAL), "{written}");
    assert_eq!(
        std::fs::read_to_string(home.path().join(".ssh/config.immortal.bak")).unwrap(),
        ORIGINAL
    );

    config_ssh(home.path(), &["--remove"]);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), ORIGINAL);
}
