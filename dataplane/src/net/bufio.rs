//! Appending reads into a `BytesMut` with monoio's owned-buffer I/O.
//!
//! monoio reads into a buffer from its start; appending therefore goes through a `SliceMut` over the spare
//! capacity. Owns nothing else. Fails: passes the I/O error through. Cost: none beyond the read itself.

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;

/// Reads into the spare capacity of `buf` (reserving `min_spare` first when less is free) and returns the
/// buffer with the new bytes appended. `Ok(0)` is end of stream.
pub async fn read_append<R: AsyncReadRent>(
    r: &mut R,
    mut buf: BytesMut,
    min_spare: usize,
) -> (std::io::Result<usize>, BytesMut) {
    if buf.capacity() - buf.len() < min_spare.max(1) {
        buf.reserve(min_spare.max(1));
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let (res, slice) = r.read(buf.slice_mut(len..cap)).await;
    (res, slice.into_inner())
}
