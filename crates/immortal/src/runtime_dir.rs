//! [`RuntimeDir`]: the per-user directory where the local agent (`immortal agent`, started by
//! `immortal relay`) keeps its Unix socket, its lock files and its log.
//!
//! The directory is, in order of preference:
//!
//! 1. `$IMMORTAL_RUNTIME_DIR` when set (for tests and unusual set-ups);
//! 2. `$XDG_RUNTIME_DIR/immortal/` when `XDG_RUNTIME_DIR` is set (systemd-logind sets it to
//!    `/run/user/<uid>`, a private tmpfs);
//! 3. `immortal-<uid>/` in the temporary directory (`$TMPDIR`, else `/tmp`). The temporary
//!    directory rather than the home directory, because homes are often shared between hosts
//!    over NFS, where a socket file of one host would shadow the agent of another.
//!
//! Whoever can open the socket is taken to be the user, so the directory must be the user's
//! alone: it is created with mode 0700, and an existing one is refused unless it belongs to the
//! user and is closed to everyone else (someone else may have created `/tmp/immortal-<uid>`
//! first).

use std::ffi::OsString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Names a directory to use instead of the default one.
pub const RUNTIME_DIR_ENV: &str = "IMMORTAL_RUNTIME_DIR";

/// The agent's socket, in the directory.
const SOCKET: &str = "agent.sock";
/// Held (exclusively, advisory) by the running agent for its whole life; holds its pid.
const AGENT_LOCK: &str = "agent.lock";
/// Held by a relay while it starts an agent, so that racing relays start one.
const START_LOCK: &str = "start.lock";
/// Where a relay-started agent's log goes.
const LOG: &str = "agent.log";

/// Why the directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeDirError {
    /// Creating or inspecting the directory failed.
    #[error("cannot use {path} for the agent's socket: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The directory exists but belongs to someone else, or others may enter it.
    #[error(
        "{path} is not private to you (owner uid {owner}, mode {mode:o}; expected uid {uid}, \
         mode 700): someone else could reach your agent through it. Remove it, or set \
         {RUNTIME_DIR_ENV} to a private directory"
    )]
    NotPrivate {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Its permission bits.
        mode: u32,
        /// The user's id.
        uid: u32,
    },
}

/// The per-user directory of the local agent. See the [module documentation](self).
///
/// ```
/// use std::path::Path;
/// use immortal::runtime_dir::RuntimeDir;
///
/// let dir = RuntimeDir::choose(None, Some("/run/user/1000".into()), Path::new("/tmp"), 1000);
/// assert_eq!(dir.path(), Path::new("/run/user/1000/immortal"));
/// assert_eq!(dir.socket(), Path::new("/run/user/1000/immortal/agent.sock"));
/// let dir = RuntimeDir::choose(None, None, Path::new("/tmp"), 1000);
/// assert_eq!(dir.path(), Path::new("/tmp/immortal-1000"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// The directory for the current user, from the environment (not created yet).
    pub fn locate() -> RuntimeDir {
        RuntimeDir::choose(
            std::env::var_os(RUNTIME_DIR_ENV),
            std::env::var_os("XDG_RUNTIME_DIR"),
            &std::env::temp_dir(),
            current_uid(),
        )
    }

    /// The directory the rules of the [module documentation](self) pick, given the values of
    /// `IMMORTAL_RUNTIME_DIR`, `XDG_RUNTIME_DIR`, the temporary directory and the user id.
    /// Empty variables count as unset.
    pub fn choose(
        explicit: Option<OsString>,
        xdg_runtime_dir: Option<OsString>,
        temp_dir: &Path,
        uid: u32,
    ) -> RuntimeDir {
        let set = |value: Option<OsString>| value.filter(|v| !v.is_empty()).map(PathBuf::from);
        let path = match (set(explicit), set(xdg_runtime_dir)) {
            (Some(explicit), _) => explicit,
            (None, Some(xdg)) => xdg.join("immortal"),
            (None, None) => temp_dir.join(format!("immortal-{uid}")),
        };
        RuntimeDir { path }
    }

    /// A directory at `path` exactly.
    pub fn at(path: impl Into<PathBuf>) -> RuntimeDir {
        RuntimeDir { path: path.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The agent's Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.path.join(SOCKET)
    }

    /// The file the running agent holds locked (and writes its pid in).
    pub fn agent_lock(&self) -> PathBuf {
        self.path.join(AGENT_LOCK)
    }

    /// The file a relay holds locked while it starts an agent.
    pub fn start_lock(&self) -> PathBuf {
        self.path.join(START_LOCK)
    }

    /// The log of a relay-started agent.
    pub fn log(&self) -> PathBuf {
        self.path.join(LOG)
    }

    /// Creates the directory (mode 0700, and its parents as needed) if it is missing, and
    /// checks that it is the user's alone.
    ///
    /// # Errors
    /// [`RuntimeDirError::Io`] if it cannot be created or inspected,
    /// [`RuntimeDirError::NotPrivate`] if it belongs to someone else or is open to others.
    pub fn ensure(&self) -> Result<(), RuntimeDirError> {
        let failed = |source| RuntimeDirError::Io {
            path: self.path.clone(),
            source,
        };
        match DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)
        {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(failed(err)),
        }
        // Not following a symbolic link: a link planted by someone else is refused below.
        let meta = std::fs::symlink_metadata(&self.path).map_err(failed)?;
        let uid = current_uid();
        let mode = meta.permissions().mode() & 0o7777;
        if !meta.is_dir() || meta.uid() != uid || mode & 0o077 != 0 {
            return Err(RuntimeDirError::NotPrivate {
                path: self.path.clone(),
                owner: meta.uid(),
                mode,
                uid,
            });
        }
        Ok(())
    }
}

/// The real user id of this process.
pub fn current_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// An advisory exclusive lock on a file (`flock`), released when dropped or when the process
/// ends, however it ends.
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Takes the lock on `path` (created, mode 0600, if missing) if nobody holds it; `None` if
    /// someone does.
    ///
    /// # Errors
    /// Opening the file or locking failing for another reason.
    pub fn try_acquire(path: &Path) -> io::Result<Option<FileLock>> {
        let file = open_lock_file(path)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(FileLock { file })),
            Err(err) if err == rustix::io::Errno::WOULDBLOCK => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Takes the lock on `path`, waiting (blocking the thread) while someone else holds it.
    ///
    /// # Errors
    /// Opening the file or locking failing.
    pub fn acquire(path: &Path) -> io::Result<FileLock> {
        let file = open_lock_file(path)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
        Ok(FileLock { file })
    }

    /// The locked file (to write a pid in, say).
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_is_chosen_in_order() {
        let tmp = Path::new("/tmp");
        let explicit = RuntimeDir::choose(Some("/x".into()), Some("/run/user/7".into()), tmp, 7);
        assert_eq!(explicit.path(), Path::new("/x"));
        let xdg = RuntimeDir::choose(Some("".into()), Some("/run/user/7".into()), tmp, 7);
        assert_eq!(xdg.path(), Path::new("/run/user/7/immortal"));
        let fallback = RuntimeDir::choose(None, Some("".into()), tmp, 7);
        assert_eq!(fallback.path(), Path::new("/tmp/immortal-7"));
    }

    #[test]
    fn a_new_directory_is_private_and_an_open_one_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = RuntimeDir::at(base.path().join("a/b"));
        dir.ensure().unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        dir.ensure().expect("an existing private directory is fine");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            dir.ensure(),
            Err(RuntimeDirError::NotPrivate { mode: 0o755, .. })
        ));
    }

    #[test]
    fn a_lock_is_held_by_one_holder_at_a_time() {
        let base = tempfile::tempdir().unwrap();
        let path = base.path().join("lock");
        let first = FileLock::try_acquire(&path).unwrap().expect("free");
        assert!(FileLock::try_acquire(&path).unwrap().is_none());
        drop(first);
        assert!(FileLock::try_acquire(&path).unwrap().is_some());
    }
}
