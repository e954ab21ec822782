//! Secrets the control plane hands out: operator tokens, provisioning tokens
//! and host stream credentials.
//!
//! A secret reads `<kind>.<id>.<random>`: the id names the stored record, the
//! random part (32 bytes, base64url) is the proof. Only the SHA-256 of the
//! whole secret is stored, and a presented secret is checked by comparing
//! hashes in constant time, so neither the store nor its timing reveals it.

use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// What a secret is for; its prefix makes a leaked one recognisable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    /// `gsto`: operator API token (`gstacks`).
    Operator,
    /// `gstp`: cluster-scoped provisioning token, only for enrollment.
    Provisioning,
    /// `gsth`: a host's stream credential.
    HostCredential,
    /// `gsma`: a mesh API token (`MeshControl.CreatePreAuthKey`).
    MeshApiToken,
    /// `gsmk`: a mesh pre-auth key (`MeshControl.RegisterNode`).
    PreAuthKey,
    /// `gsmn`: a laptop node's credential (`MeshControl.WatchNetmap`).
    NodeCredential,
}

impl SecretKind {
    pub fn prefix(self) -> &'static str {
        match self {
            SecretKind::Operator => "gsto",
            SecretKind::Provisioning => "gstp",
            SecretKind::HostCredential => "gsth",
            SecretKind::MeshApiToken => "gsma",
            SecretKind::PreAuthKey => "gsmk",
            SecretKind::NodeCredential => "gsmn",
        }
    }

    fn what(self) -> &'static str {
        match self {
            SecretKind::Operator => "operator token",
            SecretKind::Provisioning => "provisioning token",
            SecretKind::HostCredential => "stream credential",
            SecretKind::MeshApiToken => "mesh API token",
            SecretKind::PreAuthKey => "pre-auth key",
            SecretKind::NodeCredential => "node credential",
        }
    }
}

/// A secret in clear. Shown once to whoever asked for it; `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A fresh secret for the record `id`.
    pub fn generate(kind: SecretKind, id: &str) -> Secret {
        let mut random = [0u8; 32];
        rand::rng().fill_bytes(&mut random);
        let random = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random);
        Secret(format!("{}.{id}.{random}", kind.prefix()))
    }

    /// The secret in clear, to print once or send to its owner.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Hex SHA-256 of the secret: what the store keeps.
    pub fn hash(&self) -> String {
        hash_secret(&self.0)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Hex SHA-256 of a presented secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Constant-time check of a presented secret against a stored hash.
pub fn verify_secret(presented: &str, stored_hash: &str) -> bool {
    let presented = hash_secret(presented);
    presented.as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

/// Why a presented secret could not even be looked up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is malformed: expected `{prefix}.<id>.<secret>`")]
pub struct MalformedSecret {
    what: &'static str,
    prefix: &'static str,
}

/// The record id inside a presented secret of `kind`. Never echoes the input.
pub fn secret_id(kind: SecretKind, presented: &str) -> Result<&str, MalformedSecret> {
    let malformed = MalformedSecret {
        what: kind.what(),
        prefix: kind.prefix(),
    };
    let mut parts = presented.split('.');
    let (Some(prefix), Some(id), Some(random), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed);
    };
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if prefix != kind.prefix() || !id_ok || random.len() < 16 {
        return Err(malformed);
    }
    Ok(id)
}

/// The value of an `authorization: Bearer <secret>` header, if any.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let rest = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(rest.trim())
}

/// A fresh record id: `<prefix>_<12 hex>` (`tok_3f9a0c1d2e4b`).
pub fn new_id(prefix: &str) -> String {
    let mut random = [0u8; 6];
    rand::rng().fill_bytes(&mut random);
    format!("{prefix}_{}", hex::encode(random))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secret_verifies_against_its_hash_only() {
        let secret = Secret::generate(SecretKind::Provisioning, "tok_1");
        let hash = secret.hash();
        assert!(verify_secret(secret.expose(), &hash));
        let other = Secret::generate(SecretKind::Provisioning, "tok_1");
        assert!(!verify_secret(other.expose(), &hash));
        assert!(!verify_secret("", &hash));
        assert_ne!(hash, secret.expose());
        assert_eq!(hash.len(), 64);
    }

    #[test]
    fn debug_redacts() {
        let secret = Secret::generate(SecretKind::Operator, "op_1");
        let shown = format!("{secret:?}");
        assert!(!shown.contains(secret.expose()));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn id_is_parsed_and_malformed_is_refused_without_echo() {
        let secret = Secret::generate(SecretKind::HostCredential, "hst_abc");
        assert_eq!(
            secret_id(SecretKind::HostCredential, secret.expose()),
            Ok("hst_abc")
        );
        // Wrong kind, missing parts, bad id characters, short proof.
        for bad in [
            secret.expose().replacen("gsth", "gstp", 1),
            "gsth.hst_abc".to_owned(),
            "gsth..aaaaaaaaaaaaaaaaaaaa".to_owned(),
            "gsth.hst abc.aaaaaaaaaaaaaaaaaaaa".to_owned(),
            "gsth.hst_abc.short".to_owned(),
            "gsth.a.b.c".to_owned(),
            String::new(),
        ] {
            let err = secret_id(SecretKind::HostCredential, &bad).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("stream credential is malformed"), "{text}");
            if !bad.is_empty() {
                assert!(!text.contains(&bad), "{text}");
            }
        }
    }

    #[test]
    fn arbitrary_input_never_panics_and_never_verifies() {
        // A cheap stand-in for a fuzzer: every short mix of the characters
        // that matter to the parser, plus pseudo-random bytes.
        let alphabet = [
            "gsth", "gstp", "gsto", ".", "_", "a", "", "\u{0}", "é", "hst_1",
        ];
        let hash = Secret::generate(SecretKind::HostCredential, "hst_1").hash();
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    for d in alphabet {
                        let input = format!("{a}{b}{c}{d}");
                        for kind in [
                            SecretKind::Operator,
                            SecretKind::Provisioning,
                            SecretKind::HostCredential,
                        ] {
                            let _ = secret_id(kind, &input);
                        }
                        assert!(!verify_secret(&input, &hash));
                    }
                }
            }
        }
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2000 {
            let len = (state % 97) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 128) as u8
                })
                .collect();
            let input = String::from_utf8_lossy(&bytes);
            let _ = secret_id(SecretKind::HostCredential, &input);
            assert!(!verify_secret(&input, &hash));
        }
    }

    #[test]
    fn bearer_header_is_read() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer(&md), None);
        md.insert("authorization", "Bearer gsto.op_1.xyz".parse().unwrap());
        assert_eq!(bearer(&md), Some("gsto.op_1.xyz"));
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&md), None);
    }

    #[test]
    fn ids_are_unique_and_prefixed() {
        let a = new_id("tok");
        let b = new_id("tok");
        assert!(a.starts_with("tok_") && a.len() == 16, "{a}");
        assert_ne!(a, b);
    }
}
