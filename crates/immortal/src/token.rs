//! The agent's bearer token: where it lives, generating it, checking it.
//!
//! A [`Token`] is 32 random bytes, written as 64 lowercase hex digits. The agent generates one on
//! first start into a file only its user can read (mode 0600); clients read the same file (or
//! get the text another way) and present it as `Authorization: Bearer <hex>`. The agent compares
//! what it is given in constant time ([`Token::verify`]). This module owns the token's text form
//! and its file; it knows nothing of HTTP.
//!
//! The file is handled as ssh handles a private key: [`Token::load`] refuses one that its group
//! or others may read or write, anything that is not a regular file (a FIFO would hang the
//! reader, `/dev/zero` would never end), and reads at most [`MAX_TOKEN_FILE`] bytes.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use subtle::ConstantTimeEq;

/// How many random bytes a token holds: 256 bits, beyond any guessing.
pub const TOKEN_LEN: usize = 32;

/// The largest token file read: a token and its newline are 65 bytes; whitespace around it is
/// allowed up to this.
pub const MAX_TOKEN_FILE: u64 = 4096;

/// A bearer token: 32 random bytes. Its text form is 64 lowercase hex digits.
///
/// `Debug` does not print the secret, so a token can sit in a logged struct safely; use
/// [`Token::to_hex`] when the text is really wanted.
#[derive(Clone, PartialEq, Eq)]
pub struct Token([u8; TOKEN_LEN]);

/// Why a string is not a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseTokenError {
    /// The text is not 64 characters long (the length found is given).
    #[error("a token is 64 hex digits, this is {0} characters")]
    WrongLength(usize),
    /// The text has a character that is not a hex digit.
    #[error("a token is hex digits only")]
    NotHex,
}

/// Why a token file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// There is no token file at the path. Start `immortal serve` on the agent host once to
    /// generate one, then copy it, or point at the right file with `--token-file`.
    #[error("no token file at {}: run `immortal serve` once to generate one, or pass --token-file", path.display())]
    Missing {
        /// The path tried.
        path: PathBuf,
    },
    /// The file exists but does not hold a token. Delete it to have the agent generate a new
    /// one (clients then need the new token), or fix its contents.
    #[error("the token file {} does not hold a token: {source}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with its contents.
        source: ParseTokenError,
    },
    /// Its group or others may read or write the file: the token may be known to others. Make
    /// it private (`chmod 600`), or generate a new one if it may have leaked.
    #[error(
        "the token file {} is accessible by others (mode {mode:03o}): run `chmod 600 {}`, and \
         delete it to have a new token generated if others may have read it",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The path names something other than a regular file (a FIFO, a device, a directory).
    #[error("the token file {} is not a regular file ({kind})", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The file is larger than [`MAX_TOKEN_FILE`] bytes: whatever it is, it is not a token file.
    #[error("the token file {} is larger than {MAX_TOKEN_FILE} bytes: not a token file", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Reading or writing the file (or creating its directory) failed.
    #[error("token file {}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The operating system gave no random bytes.
    #[error("cannot generate a token: no randomness from the operating system: {0}")]
    Random(String),
}

impl Token {
    /// A fresh token from the operating system's random source.
    ///
    /// # Panics
    ///
    /// If the operating system has no working random source, which no supported platform
    /// lacks; [`Token::try_generate`] returns that as an error instead.
    pub fn generate() -> Token {
        Token::try_generate().expect("the operating system's random source failed")
    }

    /// A fresh token, or why the operating system could not provide randomness.
    pub fn try_generate() -> Result<Token, TokenError> {
        let mut bytes = [0u8; TOKEN_LEN];
        getrandom::fill(&mut bytes).map_err(|err| TokenError::Random(err.to_string()))?;
        Ok(Token(bytes))
    }

    /// Parses the hex text form (64 hex digits, either case; surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Token, ParseTokenError> {
        let text = text.trim();
        if text.len() != TOKEN_LEN * 2 {
            return Err(ParseTokenError::WrongLength(text.chars().count()));
        }
        let mut bytes = [0u8; TOKEN_LEN];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| ParseTokenError::NotHex)?;
        Ok(Token(bytes))
    }

    /// The text form: 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Whether `presented` (a token's hex text, as a client sent it) is this token.
    ///
    /// The comparison of the secret bytes takes the same time wherever they differ, so timing
    /// reveals nothing of the token. Text that is not a token at all is simply `false`.
    pub fn verify(&self, presented: &str) -> bool {
        match Token::from_hex(presented) {
            Ok(other) => self.0.ct_eq(&other.0).into(),
            Err(_) => false,
        }
    }

    /// Where the token lives by default: `immortal/token` in the user's configuration
    /// directory (`$XDG_CONFIG_HOME` or `~/.config` on Linux, `~/Library/Application Support`
    /// on macOS). `None` when the platform reports no such directory (no home directory).
    pub fn default_path() -> Option<PathBuf> {
        dirs::config_dir().map(|dir| dir.join("immortal").join("token"))
    }

    /// Reads the token in the file at `path` (surrounding whitespace ignored).
    ///
    /// # Errors
    /// [`TokenError::Missing`] when there is no file; [`TokenError::NotAFile`],
    /// [`TokenError::Permissions`] (group or others may read or write it),
    /// [`TokenError::TooLarge`], [`TokenError::Malformed`], [`TokenError::Io`].
    pub fn load(path: &Path) -> Result<Token, TokenError> {
        let io_error = |source: io::Error| match source.kind() {
            io::ErrorKind::NotFound => TokenError::Missing {
                path: path.to_owned(),
            },
            _ => TokenError::Io {
                path: path.to_owned(),
                source,
            },
        };
        let file = open_nonblocking(path).map_err(io_error)?;
        // Checked on the open file, so what is read is what was checked.
        let metadata = file.metadata().map_err(io_error)?;
        if let Some(kind) = not_a_file(&metadata) {
            return Err(TokenError::NotAFile {
                path: path.to_owned(),
                kind,
            });
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(TokenError::Permissions {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut io::Read::take(file, MAX_TOKEN_FILE + 1), &mut bytes)
            .map_err(io_error)?;
        if bytes.len() as u64 > MAX_TOKEN_FILE {
            return Err(TokenError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = String::from_utf8(bytes).map_err(|_| TokenError::Malformed {
            path: path.to_owned(),
            source: ParseTokenError::NotHex,
        })?;
        Token::from_hex(&text).map_err(|source| TokenError::Malformed {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads the token at `path`, or, when there is no file there, generates one and writes it
    /// (creating the parent directories). Returns the token and whether it was generated now.
    ///
    /// The new file is readable by its owner only (mode 0600) from the moment it appears, and
    /// appears whole: the token is written to a temporary file beside it, then linked into
    /// place, which fails rather than overwrite a token another process wrote meanwhile (that
    /// token is then used).
    pub fn load_or_generate(path: &Path) -> Result<(Token, bool), TokenError> {
        match Token::load(path) {
            Err(TokenError::Missing { .. }) => {}
            other => return other.map(|token| (token, false)),
        }
        let token = Token::try_generate()?;
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            create_private_dir(dir).map_err(|source| TokenError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        match write_new_file(path, format!("{}\n", token.to_hex()).as_bytes()) {
            Ok(()) => Ok((token, true)),
            // Another process generated one first: theirs is the token.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                Token::load(path).map(|token| (token, false))
            }
            Err(source) => Err(TokenError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

impl FromStr for Token {
    type Err = ParseTokenError;

    fn from_str(text: &str) -> Result<Token, ParseTokenError> {
        Token::from_hex(text)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<secret>)")
    }
}

/// Opens `path` for reading without blocking on a FIFO that has no writer (the check that it
/// is a regular file comes after the open).
fn open_nonblocking(path: &Path) -> io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    options.open(path)
}

/// What a file that is not a regular file is, in words; `None` for a regular file.
fn not_a_file(metadata: &std::fs::Metadata) -> Option<&'static str> {
    let kind = metadata.file_type();
    if kind.is_file() {
        return None;
    }
    if kind.is_dir() {
        return Some("a directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return Some("a FIFO");
        }
        if kind.is_char_device() || kind.is_block_device() {
            return Some("a device");
        }
        if kind.is_socket() {
            return Some("a socket");
        }
    }
    Some("not a regular file")
}

/// Creates `dir` and its parents; the directories created are private to the user.
fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Writes `contents` to a new file at `path` with mode 0600, never overwriting: fails with
/// `AlreadyExists` if something is there. Readers never see a partial file.
fn write_new_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut temp_name = path.file_name().unwrap_or_default().to_os_string();
    temp_name.push(format!(".tmp.{}", std::process::id()));
    let temp = path.with_file_name(temp_name);
    let result = write_private(&temp, contents).and_then(|()| std::fs::hard_link(&temp, path));
    // The link (or the failure) leaves the temporary name with nothing left to do.
    let _ = std::fs::remove_file(&temp);
    match result {
        Err(err) if err.kind() != io::ErrorKind::AlreadyExists => {
            // No hard links here (some network and FUSE file systems): create the file in
            // place, still never overwriting; a reader racing the write may see it short.
            tracing::debug!(%err, "cannot link the token file into place; writing it directly");
            write_private(path, contents)
        }
        result => result,
    }
}

/// Creates `path` (which must not exist) with mode 0600 and writes `contents`, synced.
fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let token = Token::generate();
        let text = token.to_hex();
        assert_eq!(text.len(), 64);
        assert_eq!(Token::from_hex(&text).unwrap(), token);
        assert_eq!(
            Token::from_hex(&format!("  {}\n", text.to_uppercase())).unwrap(),
            token
        );
    }

    #[test]
    fn bad_text_is_a_typed_error() {
        assert_eq!(Token::from_hex("abc"), Err(ParseTokenError::WrongLength(3)));
        assert_eq!(
            Token::from_hex(&"g".repeat(64)),
            Err(ParseTokenError::NotHex)
        );
        assert_eq!(
            Token::from_hex(&"é".repeat(32)),
            Err(ParseTokenError::NotHex)
        );
    }

    #[test]
    fn verify_accepts_only_the_token() {
        let token = Token::generate();
        assert!(token.verify(&token.to_hex()));
        assert!(!token.verify(&Token::generate().to_hex()));
        assert!(!token.verify(""));
        assert!(!token.verify("not a token"));
    }

    #[test]
    fn debug_hides_the_secret() {
        let token = Token::generate();
        assert!(!format!("{token:?}").contains(&token.to_hex()));
    }

    #[test]
    fn generate_then_load_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("token");
        assert!(matches!(
            Token::load(&path),
            Err(TokenError::Missing { .. })
        ));
        let (token, generated) = Token::load_or_generate(&path).unwrap();
        assert!(generated);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (again, generated) = Token::load_or_generate(&path).unwrap();
        assert!(!generated);
        assert_eq!(again, token);
        assert_eq!(Token::load(&path).unwrap(), token);
        // Nothing but the token file is left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("token")]);
    }

    #[cfg(unix)]
    fn write_with_mode(path: &Path, text: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_token_file_others_can_read_or_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let token = Token::generate();
        for mode in [0o644, 0o640, 0o602, 0o660] {
            write_with_mode(&path, &token.to_hex(), mode);
            let err = Token::load(&path).unwrap_err();
            assert!(
                matches!(err, TokenError::Permissions { mode: m, .. } if m == mode),
                "{mode:o}: {err}"
            );
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        for mode in [0o600, 0o400] {
            write_with_mode(&path, &token.to_hex(), mode);
            assert_eq!(Token::load(&path).unwrap(), token, "{mode:o}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn what_is_not_a_regular_file_is_refused_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        // A symbolic link to /dev/zero: read, it would never end.
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(matches!(
            Token::load(&zero),
            Err(TokenError::NotAFile {
                kind: "a device",
                ..
            })
        ));
        // A FIFO with no writer: opened normally, it would block forever.
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.map(|status| status.success()).unwrap_or(false) {
            assert!(matches!(
                Token::load(&fifo),
                Err(TokenError::NotAFile { kind: "a FIFO", .. })
            ));
        }
        assert!(matches!(
            Token::load(dir.path()),
            Err(TokenError::NotAFile { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn a_huge_token_file_is_refused_after_reading_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let text = format!("{}{}", Token::generate().to_hex(), " ".repeat(1 << 20));
        write_with_mode(&path, &text, 0o600);
        assert!(matches!(
            Token::load(&path),
            Err(TokenError::TooLarge { .. })
        ));
    }

    #[test]
    fn malformed_file_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "hello\n").unwrap();
        #[cfg(unix)]
        write_with_mode(&path, "hello\n", 0o600);
        assert!(matches!(
            Token::load(&path),
            Err(TokenError::Malformed { .. })
        ));
        assert!(matches!(
            Token::load_or_generate(&path),
            Err(TokenError::Malformed { .. })
        ));
    }
}
