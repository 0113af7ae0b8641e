//! The network layer: bytes on sockets, and nothing about money or identity.
//!
//! [`http1`] (heads and body framing), [`sse`] (event framing), [`client`] (a client connection's read and
//! write halves), [`bufio`] and [`iovec`] (appending reads, vectored writes), [`upstream`] (provider
//! connections and the per-core pools), [`handoff`] (moving a keep-alive connection to another core).

pub mod bufio;
pub mod client;
pub mod handoff;
pub mod http1;
pub mod iovec;
pub mod sse;
pub mod upstream;
