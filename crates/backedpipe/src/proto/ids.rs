//! The fixed-size byte strings of the protocol as newtypes: [`SessionId`], [`Secret`] and
//! [`Mac`]. The secret and the MAC compare in constant time, and the secret never prints.

use std::fmt;

use subtle::ConstantTimeEq;

/// A session's identifier: 16 random bytes chosen by the server. Public (it travels in clear in
/// HELLO); knowing it gives no power without the [`Secret`].
///
/// ```
/// use backedpipe::proto::SessionId;
///
/// let id = SessionId::from_bytes([0xab; 16]);
/// assert_eq!(id.to_string(), "abababababababababababababababab");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId([u8; 16]);

impl SessionId {
    /// The id with these bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> SessionId {
        SessionId(bytes)
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// A session's secret: 32 random bytes chosen by the server, sent once in WELCOME and afterwards
/// only used as the HMAC key of resume proofs.
///
/// `Debug` does not print the key, and equality is constant-time.
///
/// ```
/// use backedpipe::proto::Secret;
///
/// let secret = Secret::from_bytes([0x42; 32]);
/// assert_eq!(format!("{secret:?}"), "Secret(..)");
/// assert_eq!(secret, Secret::from_bytes([0x42; 32]));
/// ```
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    /// The secret with these bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Secret {
        Secret(bytes)
    }

    /// The key's bytes. Handle with care: whoever has them can resume the session.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Secret {}

/// An HMAC-SHA256 tag (the proofs in a resume HELLO and in RESUMED). Equality is constant-time.
///
/// ```
/// use backedpipe::proto::Mac;
///
/// assert_ne!(Mac::from_bytes([0; 32]), Mac::from_bytes([1; 32]));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Mac([u8; 32]);

impl Mac {
    /// The tag with these bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Mac {
        Mac(bytes)
    }

    /// The tag's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl PartialEq for Mac {
    fn eq(&self, other: &Mac) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Mac {}
