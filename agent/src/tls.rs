//! TLS to the control plane with a pinned certificate fingerprint
//! (`GLOBALSTACKS_CONTROL_FINGERPRINT`), for a control plane started with
//! `--dev` whose self-signed certificate's SHA-256 it printed.
//!
//! tonic's own TLS only verifies against CA roots, so a pinned connection
//! goes through [`PinnedTlsConnector`]: TCP, then rustls with a verifier that
//! accepts exactly the certificate whose DER hashes to the pinned value (and
//! still checks the handshake signatures with it), offering ALPN `h2`.
//! Verification against a CA file uses tonic's TLS directly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

use crate::error::AgentError;

/// Accepts the one certificate whose SHA-256 (of its DER) is pinned.
#[derive(Debug)]
pub struct PinnedCertVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedCertVerifier {
    pub fn new(fingerprint: [u8; 32]) -> Self {
        Self {
            fingerprint,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }
}

/// `AB:CD:...`, the way `openssl x509 -fingerprint -sha256` prints it.
pub fn format_fingerprint(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if seen == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the control plane's certificate has SHA-256 fingerprint {}, not the pinned {}",
                format_fingerprint(&seen),
                format_fingerprint(&self.fingerprint)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A tower connector for tonic: TCP to the URI's host and port, then TLS
/// verified by [`PinnedCertVerifier`].
#[derive(Clone)]
pub struct PinnedTlsConnector {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl PinnedTlsConnector {
    /// `host` is the name (or address) the URL gives, sent as SNI.
    pub fn new(fingerprint: [u8; 32], host: &str) -> Result<Self, AgentError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| AgentError::Tls {
                message: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCertVerifier::new(fingerprint)))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_owned()).map_err(|e| AgentError::Tls {
            message: format!("`{host}` is not a valid TLS server name: {e}"),
        })?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }
}

impl tower::Service<http::Uri> for PinnedTlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("`{uri}` has no host"),
                    )
                })?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_formatting() {
        assert_eq!(format_fingerprint(&[0xab, 0x01, 0xff]), "AB:01:FF");
    }

    #[test]
    fn verifier_accepts_only_the_pinned_certificate() {
        let der = CertificateDer::from(vec![1u8, 2, 3]);
        let pinned: [u8; 32] = Sha256::digest([1u8, 2, 3]).into();
        let name = ServerName::try_from("localhost").unwrap();
        let ok = PinnedCertVerifier::new(pinned).verify_server_cert(
            &der,
            &[],
            &name,
            &[],
            UnixTime::now(),
        );
        assert!(ok.is_ok());
        let err = PinnedCertVerifier::new([0; 32])
            .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not the pinned"), "{err}");
    }

    #[test]
    fn connector_accepts_names_and_addresses() {
        assert!(PinnedTlsConnector::new([0; 32], "localhost").is_ok());
        assert!(PinnedTlsConnector::new([0; 32], "127.0.0.1").is_ok());
        assert!(PinnedTlsConnector::new([0; 32], "[::1]").is_ok());
    }
}
