//! Which transport a connection uses when a peer can be reached over both TCP and QUIC.
//!
//! The swarm dials all of a peer's known addresses at once and keeps the first connection that
//! completes. QUIC's handshake takes fewer round trips than TCP's with TLS and yamux, so left
//! alone most connections between nodes that found each other in the DHT end up on QUIC. For
//! the mesh's bulk traffic, content blocks, TCP is the better path: the kernel does the
//! segmentation, and TCP's TLS uses AES-GCM where QUIC's uses ChaCha20 (see [`super::tls`]).
//! Moving 1 GiB between two nodes on loopback took 4.1-4.2 s over QUIC against 2.3 s over TCP.
//!
//! So QUIC dials start [`QUIC_DIAL_DELAY`] late, as in Happy Eyeballs (RFC 8305): when TCP
//! connects within that time the QUIC attempt is dropped before it sends a packet; when TCP is
//! blocked or slow, QUIC connects anyway, that much later. The delay is longer than Happy
//! Eyeballs' 250 ms because TCP with TLS and yamux takes three to four round trips, and mesh
//! connections live long: a peer reachable only over QUIC waits half a second once. Listening
//! and inbound connections are unchanged.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use libp2p::Multiaddr;
use libp2p::core::transport::{DialOpts, ListenerId, TransportError, TransportEvent};
use libp2p::core::{Endpoint, Transport};

/// How long a QUIC dial waits, giving a TCP dial to the same peer the lead.
pub const QUIC_DIAL_DELAY: Duration = Duration::from_millis(500);

/// A transport whose outgoing dials start `delay` late.
#[derive(Debug)]
pub struct DialLater<T> {
    inner: T,
    delay: Duration,
}

impl<T> DialLater<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, delay: Duration) -> Self {
        DialLater { inner, delay }
    }
}

impl<T> Transport for DialLater<T>
where
    T: Transport + Unpin,
    T::Dial: Send + 'static,
{
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = BoxFuture<'static, Result<T::Output, T::Error>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        // A hole punch (dialing as the listener) is timed by both sides together: not delayed.
        let delay = if opts.role == Endpoint::Dialer { self.delay } else { Duration::ZERO };
        // The inner dial does nothing until polled (QUIC connects on the first poll).
        let dial = self.inner.dial(addr, opts)?;
        Ok(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            dial.await
        }
        .boxed())
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// How long a dial may take before it fails: connecting and the security and multiplexer
/// handshakes. Without a bound, a TCP dial to an address whose packets are dropped (a node
/// behind NAT, a host gone) waits for the kernel's SYN retries, about two minutes, and holds
/// up everything waiting on it: an AutoNAT dial-back, a dial through a relay.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// The security protocols a TCP connection can use, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// TLS 1.3 ([`super::tls`]).
    Tls,
    /// Noise, for peers that offer nothing else.
    Noise,
}

impl AsRef<str> for Security {
    fn as_ref(&self) -> &str {
        match self {
            Security::Tls => super::tls::PROTOCOL,
            Security::Noise => "/noise",
        }
    }
}

/// Why securing a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(#[from] super::tls::TlsError),
    /// The noise handshake failed.
    #[error("noise: {0}")]
    Noise(#[from] libp2p::noise::Error),
}

/// TLS, or noise with peers that offer only noise.
#[derive(Clone)]
pub struct TlsOrNoise {
    tls: super::tls::Config,
    noise: libp2p::noise::Config,
}

impl std::fmt::Debug for TlsOrNoise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsOrNoise")
    }
}

impl TlsOrNoise {
    /// Both, for the node with identity `key`.
    pub fn new(key: &libp2p::identity::Keypair) -> Result<Self, SecurityError> {
        Ok(TlsOrNoise {
            tls: super::tls::Config::new(key)?,
            noise: libp2p::noise::Config::new(key)?,
        })
    }
}

type Secured<C> =
    (libp2p::PeerId, futures::future::Either<super::tls::TlsStream<C>, libp2p::noise::Output<C>>);

impl libp2p::core::UpgradeInfo for TlsOrNoise {
    type Info = Security;
    type InfoIter = std::array::IntoIter<Security, 2>;

    fn protocol_info(&self) -> Self::InfoIter {
        [Security::Tls, Security::Noise].into_iter()
    }
}

impl<C> libp2p::core::upgrade::InboundConnectionUpgrade<C> for TlsOrNoise
where
    C: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
{
    type Output = Secured<C>;
    type Error = SecurityError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, socket: C, info: Security) -> Self::Future {
        use futures::future::Either;
        async move {
            Ok(match info {
                Security::Tls => {
                    let (p, s) = self.tls.upgrade_inbound(socket, super::tls::PROTOCOL).await?;
                    (p, Either::Left(s))
                }
                Security::Noise => {
                    let (p, s) = self.noise.upgrade_inbound(socket, "/noise").await?;
                    (p, Either::Right(s))
                }
            })
        }
        .boxed()
    }
}

impl<C> libp2p::core::upgrade::OutboundConnectionUpgrade<C> for TlsOrNoise
where
    C: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
{
    type Output = Secured<C>;
    type Error = SecurityError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, socket: C, info: Security) -> Self::Future {
        use futures::future::Either;
        async move {
            Ok(match info {
                Security::Tls => {
                    let (p, s) = self.tls.upgrade_outbound(socket, super::tls::PROTOCOL).await?;
                    (p, Either::Left(s))
                }
                Security::Noise => {
                    let (p, s) = self.noise.upgrade_outbound(socket, "/noise").await?;
                    (p, Either::Right(s))
                }
            })
        }
        .boxed()
    }
}

/// TCP secured with [`TlsOrNoise`] and multiplexed with yamux, whose dials fail after
/// [`DIAL_TIMEOUT`].
pub fn tcp(
    key: &libp2p::identity::Keypair,
) -> Result<
    libp2p::core::transport::Boxed<(libp2p::PeerId, libp2p::core::muxing::StreamMuxerBox)>,
    SecurityError,
> {
    let tcp = libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::default().nodelay(true));
    Ok(tcp
        .upgrade(libp2p::core::upgrade::Version::V1Lazy)
        .authenticate(TlsOrNoise::new(key)?)
        .multiplex(libp2p::yamux::Config::default())
        .timeout(DIAL_TIMEOUT)
        .map(|(peer, muxer), _| (peer, libp2p::core::muxing::StreamMuxerBox::new(muxer)))
        .boxed())
}
