//! The rustls client configuration every connection to Nomad shares (REST, event stream, exec
//! WebSocket): the public roots plus `tls.cafile`, and `tls.certfile`/`tls.keyfile` for mTLS.
//! The workspace's one crypto provider, ring, is used.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
use crate::error::NomadError;

/// Installs ring as the process's default rustls provider (nomad-client-rs is built without a
/// provider of its own and needs one); a provider installed before is kept.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds the client configuration for `tls`.
pub fn client_config(tls: &TlsConfig) -> Result<Arc<ClientConfig>, NomadError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if !tls.cafile.is_empty() {
        let certs = CertificateDer::pem_file_iter(&tls.cafile)
            .map_err(|e| NomadError::Config(format!("nomad.tls.cafile {}: {e}", tls.cafile)))?;
        for cert in certs {
            let cert = cert
                .map_err(|e| NomadError::Config(format!("nomad.tls.cafile {}: {e}", tls.cafile)))?;
            roots
                .add(cert)
                .map_err(|e| NomadError::Config(format!("nomad.tls.cafile {}: {e}", tls.cafile)))?;
        }
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| NomadError::Config(format!("nomad.tls: {e}")))?
            .with_root_certificates(roots);
    let config = match (tls.certfile.is_empty(), tls.keyfile.is_empty()) {
        (true, true) => builder.with_no_client_auth(),
        (false, false) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.certfile)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| {
                    NomadError::Config(format!("nomad.tls.certfile {}: {e}", tls.certfile))
                })?;
            let key = PrivateKeyDer::from_pem_file(&tls.keyfile).map_err(|e| {
                NomadError::Config(format!("nomad.tls.keyfile {}: {e}", tls.keyfile))
            })?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| NomadError::Config(format!("nomad.tls.certfile/keyfile: {e}")))?
        }
        _ => {
            return Err(NomadError::Config(
                "nomad.tls.certfile and nomad.tls.keyfile must be given together".into(),
            ));
        }
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_ca_file_is_named_and_half_mtls_is_refused() {
        let err = client_config(&TlsConfig {
            active: true,
            cafile: "/nonexistent/ca.pem".into(),
            ..TlsConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("nomad.tls.cafile"), "{err}");
        let err = client_config(&TlsConfig {
            active: true,
            certfile: "c.pem".into(),
            ..TlsConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("together"), "{err}");
        assert!(client_config(&TlsConfig::default()).is_ok());
    }
}
