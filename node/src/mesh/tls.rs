//! TLS 1.3 for TCP connections, as libp2p specifies it (`/tls/1.0.0`), preferring AES-GCM.
//!
//! The handshake, certificates and checks are libp2p's own: a self-signed certificate that
//! carries the peer's identity key and its signature ([`libp2p::tls::certificate`]), exactly
//! one certificate per side, TLS 1.3 only, ALPN `libp2p`, no SNI. The server side is
//! [`libp2p::tls::make_server_config`] unchanged.
//!
//! What differs from `libp2p-tls` is the order in which this node, when it dials, offers the
//! cipher suites. `libp2p-tls` offers ChaCha20-Poly1305 first and a server takes the first suite
//! of the client's list that it supports, so every connection ends up with ChaCha20. On a CPU
//! with AES instructions AES-GCM costs a fraction of that, and bulk content is the mesh's main
//! traffic: there this node offers AES-128-GCM first. Where the CPU has no AES instructions
//! ChaCha20-Poly1305 stays first. Any libp2p TLS peer interoperates either way: the suites
//! offered are the same three.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, FutureExt};
pub use futures_rustls::TlsStream;
use libp2p::PeerId;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::identity::Keypair;
use libp2p::tls::certificate;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// The protocol name libp2p gives TLS.
pub const PROTOCOL: &str = "/tls/1.0.0";

/// Why TLS could not be set up, or a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate for this node's key could not be made.
    #[error("making this node's TLS certificate: {0}")]
    Certificate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The handshake failed (the peer's certificate, or the connection).
    #[error("TLS handshake: {0}")]
    Handshake(#[from] std::io::Error),
    /// The handshake finished without exactly one valid libp2p certificate from the peer.
    #[error("TLS peer certificate: {0}")]
    PeerCertificate(String),
}

/// The security upgrade: use as the TCP transport's security protocol.
#[derive(Clone)]
pub struct Config {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("tls::Config").field("suites", &offered_suites()).finish()
    }
}

/// The cipher suites offered when dialing, best first.
pub fn offered_suites() -> [rustls::SupportedCipherSuite; 3] {
    if has_aes_instructions() {
        [TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256]
    } else {
        [TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384]
    }
}

fn has_aes_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

impl Config {
    /// TLS for the node with identity `keypair`.
    pub fn new(keypair: &Keypair) -> Result<Self, TlsError> {
        let server = libp2p::tls::make_server_config(keypair)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let (cert, key) =
            certificate::generate(keypair).map_err(|e| TlsError::Certificate(e.to_string()))?;
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.cipher_suites = offered_suites().to_vec();
        let signer = provider.key_provider.load_private_key(key)?;
        let own = OwnCertificate(Arc::new(rustls::sign::CertifiedKey::new(vec![cert], signer)));
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerCertificate))
            .with_client_cert_resolver(Arc::new(own));
        client.alpn_protocols = vec![b"libp2p".to_vec()];
        Ok(Config { server: Arc::new(server), client: Arc::new(client) })
    }
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once(PROTOCOL)
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            let stream = futures_rustls::TlsAcceptor::from(self.server).accept(socket).await?;
            let peer = peer_id(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            // The specification: no SNI. An unspecified address as the name sends none.
            let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
            let stream =
                futures_rustls::TlsConnector::from(self.client).connect(name, socket).await?;
            let peer = peer_id(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

/// The identity in the peer's one certificate (already verified during the handshake).
fn peer_id(state: &rustls::CommonState) -> Result<PeerId, TlsError> {
    match state.peer_certificates() {
        Some([cert]) => certificate::parse(cert)
            .map(|c| c.peer_id())
            .map_err(|e| TlsError::PeerCertificate(e.to_string())),
        Some(certs) => {
            Err(TlsError::PeerCertificate(format!("{} certificates, expected one", certs.len())))
        }
        None => Err(TlsError::PeerCertificate("none presented".into())),
    }
}

/// This node's certificate, presented when the server asks (libp2p always does). It is given
/// as is: rustls's own loading would refuse the libp2p extension, which is marked critical.
#[derive(Debug)]
struct OwnCertificate(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for OwnCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Accepts a server exactly when its one certificate is a valid libp2p certificate and the
/// handshake is signed by that certificate's key. Which peer it is, the swarm checks against
/// the address it dialed.
#[derive(Debug)]
struct PeerCertificate;

fn bad_certificate(e: impl std::fmt::Display) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        std::io::Error::other(e.to_string()),
    ))))
}

impl ServerCertVerifier for PeerCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(bad_certificate("a libp2p peer presents exactly one certificate"));
        }
        certificate::parse(end_entity).map_err(bad_certificate)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("libp2p uses TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let cert = certificate::parse(cert).map_err(bad_certificate)?;
        cert.verify_signature(dss.scheme, message, dss.signature())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        // The schemes a libp2p certificate key may use.
        vec![
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ED25519,
            SignatureScheme::RSA_PSS_SHA512,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA512,
            SignatureScheme::RSA_PKCS1_SHA384,
            SignatureScheme::RSA_PKCS1_SHA256,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

    type Stream = TlsStream<Compat<TcpStream>>;

    /// Runs a real handshake over loopback TCP between `client` (dialing) and `server`.
    async fn handshake<S, D>(
        server: S,
        client: D,
    ) -> (Result<(PeerId, Stream), String>, Result<(PeerId, Stream), String>)
    where
        S: InboundConnectionUpgrade<Compat<TcpStream>, Output = (PeerId, Stream)>
            + UpgradeInfo<Info = &'static str>,
        S::Error: std::fmt::Display,
        D: OutboundConnectionUpgrade<Compat<TcpStream>, Output = (PeerId, Stream)>
            + UpgradeInfo<Info = &'static str>,
        D::Error: std::fmt::Display,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = async {
            let (socket, _) = listener.accept().await.unwrap();
            server.upgrade_inbound(socket.compat(), PROTOCOL).await.map_err(|e| e.to_string())
        };
        let dial = async {
            let socket = TcpStream::connect(addr).await.unwrap();
            client.upgrade_outbound(socket.compat(), PROTOCOL).await.map_err(|e| e.to_string())
        };
        tokio::join!(accept, dial)
    }

    fn suite(stream: &Stream) -> rustls::CipherSuite {
        stream.get_ref().1.negotiated_cipher_suite().expect("handshake done").suite()
    }

    #[tokio::test]
    async fn two_nodes_learn_each_other_s_identity_and_use_the_dialer_s_first_suite() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (inbound, outbound) =
            handshake(Config::new(&a).unwrap(), Config::new(&b).unwrap()).await;
        let ((seen_by_a, sa), (seen_by_b, sb)) = (inbound.unwrap(), outbound.unwrap());
        assert_eq!(seen_by_a, b.public().to_peer_id());
        assert_eq!(seen_by_b, a.public().to_peer_id());
        let want = offered_suites()[0].suite();
        assert_eq!((suite(&sa), suite(&sb)), (want, want));
        if has_aes_instructions() {
            assert_eq!(want, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        }
    }

    #[tokio::test]
    async fn stock_libp2p_tls_peers_interoperate_both_ways() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        // A stock dialer gets its own first choice from this node.
        let stock = libp2p::tls::Config::new(&b).unwrap();
        let (inbound, outbound) = handshake(Config::new(&a).unwrap(), stock).await;
        let ((seen_by_a, sa), (seen_by_b, _)) = (inbound.unwrap(), outbound.unwrap());
        assert_eq!((seen_by_a, seen_by_b), (b.public().to_peer_id(), a.public().to_peer_id()));
        assert_eq!(suite(&sa), rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
        // Dialing a stock server, this node's preference wins.
        let stock = libp2p::tls::Config::new(&a).unwrap();
        let (inbound, outbound) = handshake(stock, Config::new(&b).unwrap()).await;
        let ((seen_by_a, _), (seen_by_b, sb)) = (inbound.unwrap(), outbound.unwrap());
        assert_eq!((seen_by_a, seen_by_b), (b.public().to_peer_id(), a.public().to_peer_id()));
        assert_eq!(suite(&sb), offered_suites()[0].suite());
    }

    /// A server whose certificate is an ordinary self-signed one, without the libp2p extension
    /// that binds it to a peer identity.
    #[derive(Clone)]
    struct Impostor(Arc<rustls::ServerConfig>);

    impl UpgradeInfo for Impostor {
        type Info = &'static str;
        type InfoIter = std::iter::Once<Self::Info>;
        fn protocol_info(&self) -> Self::InfoIter {
            std::iter::once(PROTOCOL)
        }
    }

    impl InboundConnectionUpgrade<Compat<TcpStream>> for Impostor {
        type Output = (PeerId, Stream);
        type Error = std::io::Error;
        type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;
        fn upgrade_inbound(self, socket: Compat<TcpStream>, _: Self::Info) -> Self::Future {
            async move {
                let s = futures_rustls::TlsAcceptor::from(self.0).accept(socket).await?;
                Ok((PeerId::random(), s.into()))
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn a_server_without_a_libp2p_certificate_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["peer".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.cipher_suites = offered_suites().to_vec();
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], der.into())
            .unwrap();
        server.alpn_protocols = vec![b"libp2p".to_vec()];
        let client = Config::new(&Keypair::generate_ed25519()).unwrap();
        let (_, outbound) = handshake(Impostor(Arc::new(server)), client).await;
        let err = outbound.map(|(p, _)| p).expect_err("the dialer refuses the certificate");
        assert!(err.contains("certificate"), "{err}");
    }
}
