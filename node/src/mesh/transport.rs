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
