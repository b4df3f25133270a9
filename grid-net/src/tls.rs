//! Who a member is and whom it trusts: the cluster CA, the member certificate, and the
//! rustls configurations built from them.
//!
//! Two ways to get an [`Identity`]:
//! - [`Identity::from_pem_files`] (production): a CA certificate, a member certificate chain
//!   and its key, all PEM.
//! - [`Identity::from_secret`] (development): every member derives the same Ed25519 CA key
//!   from a shared secret with HKDF-SHA256, self-signs the same CA certificate (fixed serial
//!   and validity, deterministic Ed25519 signature: byte-identical everywhere), and issues
//!   itself a fresh member certificate. A member with another secret has another CA, and
//!   neither side accepts the other's certificate.
//!
//! Trust is "holds a certificate signed by the cluster CA". Member addresses are not stable
//! names, so the client side checks the chain but not the host name (see
//! [`ClusterServerVerifier`]); the server side requires a client certificate signed by the
//! CA (mutual TLS).

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber, PKCS_ED25519,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::NetError;

/// The ALPN name of grid's wire protocol. A peer speaking another version is refused during
/// the TLS handshake.
pub const ALPN: &[u8] = b"grid/4";

/// The server name a member presents when dialing. Not checked against the certificate (see
/// [`ClusterServerVerifier`]).
pub(crate) const SERVER_NAME: &str = "grid.member";

/// A member's TLS identity: the CA it trusts and the certificate it presents.
#[derive(Clone)]
pub struct Identity {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    derived: bool,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("derived_from_secret", &self.derived)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Tls(format!("{what}: {e}"))
}

/// Builds a PKCS#8 v1 document (RFC 8410) around a raw Ed25519 seed.
fn ed25519_pkcs8_from_seed(seed: &[u8; 32]) -> Vec<u8> {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(seed);
    der
}

impl Identity {
    /// Development identity: derives the cluster CA from `secret` and issues a member
    /// certificate for `member_name` signed by it.
    ///
    /// ```
    /// let a = grid_net::tls::Identity::from_secret(b"s3cret", "a").unwrap();
    /// let b = grid_net::tls::Identity::from_secret(b"s3cret", "b").unwrap();
    /// assert_eq!(a.ca_der(), b.ca_der()); // same secret, same CA, byte for byte
    /// ```
    pub fn from_secret(secret: &[u8], member_name: &str) -> Result<Self, NetError> {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"grid/1 development cluster CA"), secret);
        let mut seed = [0u8; 32];
        hk.expand(b"ed25519 CA key", &mut seed)
            .map_err(|e| tls_err("deriving CA key", e))?;
        let ca_key = KeyPair::try_from(ed25519_pkcs8_from_seed(&seed).as_slice())
            .map_err(|e| tls_err("CA key", e))?;

        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| tls_err("CA params", e))?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "grid development cluster CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params.serial_number = Some(SerialNumber::from(vec![1u8]));
        ca_params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        ca_params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(|e| tls_err("CA certificate", e))?;

        let member_key =
            KeyPair::generate_for(&PKCS_ED25519).map_err(|e| tls_err("member key", e))?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(|e| tls_err("member params", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, member_name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params
            .signed_by(&member_key, &ca_cert, &ca_key)
            .map_err(|e| tls_err("member certificate", e))?;

        Ok(Self {
            ca: ca_cert.der().clone(),
            chain: vec![cert.der().clone()],
            key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                member_key.serialize_der(),
            ))),
            derived: true,
        })
    }

    /// Production identity from PEM files: the cluster CA certificate, this member's
    /// certificate (chain) and its private key.
    pub fn from_pem_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, NetError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| tls_err(&format!("reading {}", p.display()), e))
        };
        Self::from_pem(&read(ca)?, &read(cert)?, &read(key)?)
    }

    /// Production identity from PEM text (see [`Identity::from_pem_files`]).
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, NetError> {
        let ca = rustls_pemfile::certs(&mut &ca[..])
            .next()
            .ok_or_else(|| NetError::Tls("no certificate in the CA PEM".into()))?
            .map_err(|e| tls_err("CA PEM", e))?;
        let chain = rustls_pemfile::certs(&mut &cert[..])
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_err("member certificate PEM", e))?;
        if chain.is_empty() {
            return Err(NetError::Tls("no certificate in the member PEM".into()));
        }
        let key = rustls_pemfile::private_key(&mut &key[..])
            .map_err(|e| tls_err("member key PEM", e))?
            .ok_or_else(|| NetError::Tls("no private key in the key PEM".into()))?;
        Ok(Self {
            ca,
            chain,
            key: Arc::new(key),
            derived: false,
        })
    }

    /// The CA certificate (DER) this member trusts.
    pub fn ca_der(&self) -> &[u8] {
        &self.ca
    }

    /// Whether this identity was derived from a shared secret (development setting).
    pub fn is_derived(&self) -> bool {
        self.derived
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, NetError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| tls_err("CA certificate", e))?;
        Ok(Arc::new(roots))
    }

    /// rustls server side: TLS 1.3 only, a client certificate signed by the CA required,
    /// ALPN `grid/4` only.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, NetError> {
        let provider = Self::provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| tls_err("client verifier", e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("TLS versions", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| tls_err("member certificate", e))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.max_early_data_size = 0;
        Ok(config)
    }

    /// rustls client side: TLS 1.3 only, the server's chain checked against the CA, our
    /// certificate presented, ALPN `grid/4`.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, NetError> {
        self.client_config_with_alpn(ALPN)
    }

    /// As [`Identity::client_config`] but offering another ALPN name (tests of protocol
    /// version refusal use it).
    pub fn client_config_with_alpn(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, NetError> {
        let provider = Self::provider();
        let inner = WebPkiServerVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| tls_err("server verifier", e))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("TLS versions", e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ClusterServerVerifier { inner }))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| tls_err("member certificate", e))?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

/// Checks a server's certificate chain against the cluster CA like webpki does, but does
/// not require the certificate to name the address we dialed: membership of the cluster is
/// what a certificate proves, and member addresses change. Every other failure (unknown
/// issuer, bad signature, expiry, wrong usage) is still an error.
#[derive(Debug)]
pub struct ClusterServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ClusterServerVerifier {
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

/// Turns a handshake failure into a sentence that says which of the usual causes it is,
/// and whether it deserves a warning (a configuration problem) or not (a peer that is down
/// or leaving, which gossip runs into all the time).
pub(crate) fn explain_handshake_error(err: &str) -> (bool, &'static str) {
    let e = err.to_ascii_lowercase();
    // quinn's generic "the application or application protocol caused the connection to be
    // closed during the handshake" is a peer closing its endpoint, not an ALPN mismatch
    // (TLS alert 120, or rustls's "doesn't support any known protocol").
    if e.contains("caused the connection to be closed") {
        (false, "the peer closed the connection during the handshake")
    } else if e.contains("error 120") || e.contains("known protocol") {
        (
            true,
            "the peer speaks another grid protocol version (ALPN mismatch)",
        )
    } else if e.contains("certificate")
        || e.contains("unknownissuer")
        || e.contains("unknown ca")
        || e.contains("badsignature")
        || e.contains("crypto")
        || e.contains("handshake")
    {
        (
            true,
            "certificate not accepted: the peer has another cluster secret or CA (with default \
             secrets, another cluster name)",
        )
    } else if e.contains("refused to accept") {
        (false, "the peer is shutting down")
    } else if e.contains("timed out") {
        (false, "no answer: the peer is down or unreachable")
    } else if e == "closed" || e.contains("endpoint stopping") {
        (false, "this member is shutting down")
    } else {
        (true, "the connection could not be established")
    }
}

/// How often a refused handshake from one address is logged as a warning; the others in
/// between are counted and reported with the next one.
const HANDSHAKE_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Addresses remembered by the limiter; past this it starts over (a scan from many
/// addresses then logs at most this many warnings per period).
const HANDSHAKE_WARNING_PEERS: usize = 1024;

/// Limits the warnings about refused handshakes: a misconfigured peer retries every few
/// hundred milliseconds, and a log line each time drowns everything else.
#[derive(Debug, Default)]
pub(crate) struct HandshakeWarnings {
    /// Per peer: when it was last warned about, and the failures since.
    peers: std::sync::Mutex<
        std::collections::HashMap<std::net::SocketAddr, (tokio::time::Instant, u64)>,
    >,
}

impl HandshakeWarnings {
    /// Whether a failure from `peer` at `now` is to be logged as a warning: `Some(n)`
    /// with the `n` failures suppressed since the last warning, or `None` to count it only.
    pub(crate) fn admit(
        &self,
        peer: std::net::SocketAddr,
        now: tokio::time::Instant,
    ) -> Option<u64> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() >= HANDSHAKE_WARNING_PEERS && !peers.contains_key(&peer) {
            peers.clear();
        }
        match peers.get_mut(&peer) {
            Some((last, suppressed))
                if now.saturating_duration_since(*last) < HANDSHAKE_WARNING_EVERY =>
            {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                peers.insert(peer, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_closing_during_the_handshake_is_not_an_alpn_mismatch() {
        let closed = "the application or application protocol caused the connection to be \
                      closed during the handshake";
        let (serious, why) = explain_handshake_error(closed);
        assert!(!serious);
        assert!(!why.contains("ALPN"), "{why}");
        let (serious, why) =
            explain_handshake_error("the cryptographic handshake failed: error 120");
        assert!(serious);
        assert!(why.contains("ALPN"), "{why}");
    }

    #[test]
    fn refused_handshakes_warn_once_per_period_per_peer() {
        let limiter = HandshakeWarnings::default();
        let a: std::net::SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: std::net::SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let t0 = tokio::time::Instant::now();
        assert_eq!(limiter.admit(a, t0), Some(0));
        for i in 1..=5 {
            assert_eq!(
                limiter.admit(a, t0 + std::time::Duration::from_millis(i * 300)),
                None
            );
        }
        assert_eq!(
            limiter.admit(b, t0),
            Some(0),
            "another peer has its own budget"
        );
        assert_eq!(limiter.admit(a, t0 + HANDSHAKE_WARNING_EVERY), Some(5));
    }

    #[test]
    fn same_secret_same_ca_other_secret_other_ca() {
        let a = Identity::from_secret(b"one", "a").unwrap();
        let b = Identity::from_secret(b"one", "b").unwrap();
        let c = Identity::from_secret(b"two", "c").unwrap();
        assert_eq!(a.ca_der(), b.ca_der());
        assert_ne!(a.ca_der(), c.ca_der());
        assert!(a.server_config().is_ok());
        assert!(a.client_config().is_ok());
    }
}
