//! TLS setup: rustls with ring, the system roots plus an optional PEM bundle, or (when the
//! user asked for it) no certificate checks at all.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::error::AwxError;

/// Builds the rustls configuration for one AWX endpoint.
///
/// A CA bundle is always parsed, even when verification is off, so a broken bundle is
/// reported instead of lying unnoticed until someone turns verification back on.
pub(crate) fn client_config(
    ca_bundle_pem: Option<&[u8]>,
    insecure_skip_tls_verify: bool,
) -> Result<ClientConfig, AwxError> {
    let bundle = ca_bundle_pem.map(parse_ca_bundle).transpose()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| AwxError::ClientSetup {
            detail: format!("rustls rejected its protocol versions: {e}"),
        })?;

    if insecure_skip_tls_verify {
        tracing::warn!(
            "TLS certificate verification is disabled for this AWX endpoint \
             (insecureSkipTlsVerify); anyone on the network path can read its tokens"
        );
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(DangerousAcceptAnyServerCertificate {
                provider,
            }))
            .with_no_client_auth());
    }

    let mut roots = RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    for error in &system.errors {
        tracing::debug!(%error, "could not load part of the system certificate store");
    }
    let (added, ignored) = roots.add_parsable_certificates(system.certs);
    if ignored > 0 {
        tracing::debug!(
            ignored,
            "ignored unparsable certificates in the system store"
        );
    }
    match bundle {
        Some(certs) => {
            for (index, cert) in certs.into_iter().enumerate() {
                roots.add(cert).map_err(|e| AwxError::InvalidCaBundle {
                    detail: format!(
                        "certificate {} is not a usable CA certificate ({e})",
                        index + 1
                    ),
                })?;
            }
        }
        None if added == 0 => tracing::warn!(
            "the system certificate store is empty and no CA bundle is configured; \
             https connections to AWX will fail"
        ),
        None => {}
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Every CERTIFICATE block of a PEM bundle; other block types (keys, CRLs) are skipped.
pub(crate) fn parse_ca_bundle(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, AwxError> {
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem) {
        let cert = item.map_err(|e| AwxError::InvalidCaBundle {
            detail: match e {
                rustls::pki_types::pem::Error::MissingSectionEnd { .. } => {
                    "a PEM block has no END line".to_owned()
                }
                rustls::pki_types::pem::Error::IllegalSectionStart { .. } => {
                    "a PEM BEGIN line is malformed".to_owned()
                }
                rustls::pki_types::pem::Error::Base64Decode(_) => {
                    "a PEM block is not valid base64".to_owned()
                }
                other => format!("the PEM cannot be read ({other})"),
            },
        })?;
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err(AwxError::InvalidCaBundle {
            detail: "it contains no PEM CERTIFICATE block".to_owned(),
        });
    }
    Ok(certs)
}

/// Accepts any server certificate for any name: the connection is encrypted but not
/// authenticated. Only used when the user set insecureSkipTlsVerify. Handshake signatures
/// are still checked, so the peer must at least hold the key of the certificate it sent.
#[derive(Debug)]
pub(crate) struct DangerousAcceptAnyServerCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for DangerousAcceptAnyServerCertificate {
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

/// Words for a person about a rustls failure.
pub(crate) fn describe_tls_error(error: &rustls::Error) -> String {
    use rustls::{CertificateError, Error};
    match error {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "AWX's certificate is not signed by a trusted CA (UnknownIssuer)".to_owned()
        }
        Error::InvalidCertificate(CertificateError::NotValidForName)
        | Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
            "AWX's certificate does not name this host (NotValidForName)".to_owned()
        }
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "AWX's certificate has expired".to_owned()
        }
        Error::InvalidCertificate(other) => format!("AWX's certificate is not valid ({other:?})"),
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => {
            format!("the server did not answer in TLS ({error}), so it probably serves plain http")
        }
        other => other.to_string(),
    }
}
