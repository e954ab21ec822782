//! The server certificate: given by flags, or a self-signed one that `--dev`
//! writes into the data dir on first start. Clients trust exactly that PEM
//! (`GLOBALSTACKS_CONTROL_CA_FILE`, `GLOBALSTACKS_API_CA_FILE`) or pin the
//! SHA-256 fingerprint printed at start.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::error::{ControlError, Result};

/// A certificate chain and its private key, both PEM. `Debug` hides the key.
#[derive(Clone)]
pub struct TlsMaterial {
    pub cert_path: PathBuf,
    pub cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads and checks a certificate chain and key given by flags.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<TlsMaterial> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| ControlError::Io {
                path: path.to_owned(),
                source,
            })
        };
        let material = TlsMaterial {
            cert_path: cert_path.to_owned(),
            cert_pem: read(cert_path)?,
            key_pem: read(key_path)?,
        };
        first_certificate_der(&material.cert_pem)
            .map_err(|reason| ControlError::Tls(format!("{}: {reason}", cert_path.display())))?;
        let mut key = material.key_pem.as_slice();
        match rustls_pemfile::private_key(&mut key) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(ControlError::Tls(format!(
                    "{}: no private key in PEM",
                    key_path.display()
                )))
            }
            Err(err) => {
                return Err(ControlError::Tls(format!(
                    "{}: not a PEM private key: {err}",
                    key_path.display()
                )))
            }
        }
        Ok(material)
    }

    /// The dev certificate in `<data_dir>/tls/`, made on first use for
    /// `localhost`, `127.0.0.1`, `::1` and this machine's host name. Returns
    /// the material and whether it was created now.
    pub fn ensure_dev(data_dir: &Path) -> Result<(TlsMaterial, bool)> {
        let dir = data_dir.join("tls");
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        if cert_path.exists() && key_path.exists() {
            return Ok((TlsMaterial::load(&cert_path, &key_path)?, false));
        }
        create_private_dir(&dir)?;
        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let host = host.trim();
            if !host.is_empty() && host != "localhost" {
                names.push(host.to_owned());
            }
        }
        let certified = rcgen::generate_simple_self_signed(names)
            .map_err(|err| ControlError::Tls(format!("generating the dev certificate: {err}")))?;
        // Key first, 0600 from its creation; the cert marks completion.
        write_new_file(
            &key_path,
            certified.signing_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_new_file(&cert_path, certified.cert.pem().as_bytes(), 0o644)?;
        Ok((TlsMaterial::load(&cert_path, &key_path)?, true))
    }

    pub fn identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// `AB:CD:...` SHA-256 of the first certificate (the leaf), as
    /// `openssl x509 -noout -fingerprint -sha256` prints it.
    pub fn fingerprint(&self) -> Result<String> {
        let der = first_certificate_der(&self.cert_pem).map_err(|reason| {
            ControlError::Tls(format!("{}: {reason}", self.cert_path.display()))
        })?;
        Ok(fingerprint_der(&der))
    }
}

fn first_certificate_der(pem: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut reader = pem;
    let first = rustls_pemfile::certs(&mut reader).next();
    match first {
        Some(Ok(cert)) => Ok(cert.as_ref().to_vec()),
        Some(Err(err)) => Err(format!("not a PEM certificate: {err}")),
        None => Err("no certificate in PEM".to_owned()),
    }
}

pub fn fingerprint_der(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Creates `dir` (and parents) with mode 0700 for the leaf.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| ControlError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Writes a new file with `mode` from its creation (never a moment wider).
pub fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn dev_certificate_is_made_once_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let (first, created) = TlsMaterial::ensure_dev(dir.path()).unwrap();
        assert!(created);
        let mode = std::fs::metadata(dir.path().join("tls/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let fp = first.fingerprint().unwrap();
        assert_eq!(fp.len(), 32 * 3 - 1, "{fp}");
        let (second, created) = TlsMaterial::ensure_dev(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(second.fingerprint().unwrap(), fp);
        assert!(!format!("{second:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem").unwrap();
        let err = TlsMaterial::load(&cert, &key).unwrap_err().to_string();
        assert!(
            err.contains("cert.pem") && err.contains("no certificate"),
            "{err}"
        );
        let missing = TlsMaterial::load(&dir.path().join("nope.pem"), &key)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope.pem"), "{missing}");
        let (dev, _) = TlsMaterial::ensure_dev(dir.path()).unwrap();
        let err = TlsMaterial::load(&dev.cert_path, &key)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key.pem") && err.contains("no private key"),
            "{err}"
        );
    }
}
