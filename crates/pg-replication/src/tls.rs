//! TLS for replication connections: which rustls configuration each `sslmode` gets.
//!
//! Mirrors libpq's semantics (src/interfaces/libpq/fe-secure-openssl.c,
//! `verify_peer_name_matches_certificate`): `require` encrypts without checking the certificate,
//! `verify-ca` checks the chain only, `verify-full` checks chain and host name.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::ReplicationError;

/// How much of the server certificate to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    Nothing,
    Chain,
    ChainAndName,
}

fn tls_err(e: impl std::fmt::Display) -> ReplicationError {
    ReplicationError::Tls(e.to_string())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Largest certificate file read: a bundle of a few hundred CAs is a few hundred kilobytes.
pub const MAX_CERT_FILE: u64 = 4 << 20;

/// The bytes of certificate file `path`: a regular file (a FIFO or device named in its place
/// is refused without blocking) of at most [`MAX_CERT_FILE`] bytes.
pub fn read_cert_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    let refuse = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    let mut out = Vec::new();
    file.take(MAX_CERT_FILE + 1).read_to_end(&mut out)?;
    if out.len() as u64 > MAX_CERT_FILE {
        return Err(refuse(format!("larger than {MAX_CERT_FILE} bytes")));
    }
    Ok(out)
}

fn load_roots(path: &Path) -> Result<RootCertStore, ReplicationError> {
    let pem = read_cert_file(path)
        .map_err(|e| tls_err(format!("cannot read sslrootcert {}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| tls_err(format!("bad PEM in {}: {e}", path.display())))?;
        roots.add(cert).map_err(tls_err)?;
    }
    if roots.is_empty() {
        return Err(tls_err(format!("no certificates in {}", path.display())));
    }
    Ok(roots)
}

/// Builds the client configuration for `verify`, reading `root_cert` when verification is asked.
pub(crate) fn client_config(
    verify: Verify,
    root_cert: Option<&Path>,
) -> Result<Arc<ClientConfig>, ReplicationError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Nothing => Arc::new(AcceptAnyCertificate { provider }),
        Verify::Chain | Verify::ChainAndName => {
            let path = root_cert.ok_or_else(|| {
                tls_err("sslrootcert is required for sslmode verify-ca/verify-full")
            })?;
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(load_roots(path)?), provider)
                    .build()
                    .map_err(tls_err)?;
            if verify == Verify::Chain {
                Arc::new(ChainOnly { inner: webpki })
            } else {
                webpki
            }
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name to verify (and send as SNI); an IP literal is matched against IP SANs.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, ReplicationError> {
    ServerName::try_from(host.to_owned()).map_err(|e| tls_err(format!("bad host {host:?}: {e}")))
}

/// `sslmode=require`: encryption against passive eavesdroppers only, like libpq.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

/// `sslmode=verify-ca`: full WebPKI chain validation, but a name mismatch is accepted.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_files_are_regular_and_bounded() {
        let dir = testkit::temp_dir("strata-cert-");
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, b"-----BEGIN CERTIFICATE-----\n").unwrap();
        assert_eq!(read_cert_file(&pem).unwrap().len(), 28);
        // A device or FIFO named as the file is refused at once, not read forever.
        let err = read_cert_file(Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let fifo = dir.join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let err = read_cert_file(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let big = dir.join("big.pem");
        std::fs::write(&big, vec![b'A'; MAX_CERT_FILE as usize + 1]).unwrap();
        let err = read_cert_file(&big).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        let err = load_roots(&fifo).unwrap_err().to_string();
        assert!(err.contains("cannot read sslrootcert"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
