//! WireGuard keys: x25519 private and public keys and preshared keys, in the
//! base64 form of wg-quick files. Secrets never appear in `Debug` output.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// What is wrong with a key's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not valid base64")]
    NotBase64,
    #[error("key decodes to {0} bytes, expected 32")]
    WrongLength(usize),
}

fn decode32(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| KeyError::NotBase64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::WrongLength(bytes.len()))
}

/// A node's x25519 private key. It never leaves the node.
#[derive(Clone)]
pub struct PrivateKey(x25519_dalek::StaticSecret);

impl PrivateKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Self {
        PrivateKey(x25519_dalek::StaticSecret::random())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PrivateKey(x25519_dalek::StaticSecret::from(bytes))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The base64 text of a wg-quick `PrivateKey =` line. Treat it as a secret.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }

    pub fn as_static_secret(&self) -> &x25519_dalek::StaticSecret {
        &self.0
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(text: &str) -> Result<Self, KeyError> {
        decode32(text).map(PrivateKey::from_bytes)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

/// A peer's x25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_x25519(self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.0)
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(text: &str) -> Result<Self, KeyError> {
        decode32(text).map(PublicKey)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// An optional symmetric key mixed into the handshake (wg-quick `PresharedKey`).
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey(pub [u8; 32]);

impl PresharedKey {
    pub fn generate() -> Self {
        PresharedKey(PrivateKey::generate().to_bytes())
    }

    /// The base64 text of a wg-quick `PresharedKey =` line. Treat it as a secret.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl FromStr for PresharedKey {
    type Err = KeyError;
    fn from_str(text: &str) -> Result<Self, KeyError> {
        decode32(text).map(PresharedKey)
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_and_public_key_derivation() {
        let private = PrivateKey::generate();
        let again: PrivateKey = private.to_base64().parse().unwrap();
        assert_eq!(again.to_bytes(), private.to_bytes());
        assert_eq!(again.public_key(), private.public_key());
        let public: PublicKey = private.public_key().to_string().parse().unwrap();
        assert_eq!(public, private.public_key());
    }

    #[test]
    fn known_vector_from_wg_pubkey() {
        // `echo yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= | wg pubkey`
        let private: PrivateKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
            .parse()
            .unwrap();
        assert_eq!(
            private.public_key().to_string(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn bad_text_is_refused_with_the_reason() {
        assert_eq!("not base64!".parse::<PublicKey>(), Err(KeyError::NotBase64));
        assert_eq!("AAAA".parse::<PublicKey>(), Err(KeyError::WrongLength(3)));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let private = PrivateKey::generate();
        let psk = PresharedKey::generate();
        let shown = format!("{private:?} {psk:?}");
        assert!(!shown.contains(&private.to_base64()));
        assert!(!shown.contains(&psk.to_base64()));
    }
}
