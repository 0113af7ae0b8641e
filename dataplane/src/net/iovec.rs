//! Vectored writes of refcounted buffers: one `writev` for a response head plus its body pieces, or for a
//! chunk header, the chunk and its CRLF, without copying any of them into a staging buffer.
//!
//! Owns: [`IoVecs`], a list of [`Bytes`] with the matching `iovec` array, handed to monoio's
//! `write_vectored_all`. One of the data plane's two `unsafe` items (the other is in [`crate::net::handoff`]), allowed on that item alone: monoio's `IoVecBuf` is an unsafe trait
//! (the runtime reads the memory the iovecs point at while the operation is in flight).
//! Why it pays: the profile of a non-streamed request showed ~80% of the core's time in the kernel's TCP
//! send path, and writing head and body separately cost one extra send (and one extra wake-up of the peer)
//! per direction; see docs/benchmarks.md.
//! Fails: never; I/O errors come back from the write call. Cost: one small Vec push per buffer.

use bytes::Bytes;
use monoio::buf::IoVecBuf;

/// Buffers to write with one vectored write, in order.
#[derive(Debug, Default)]
pub struct IoVecs {
    bufs: Vec<Bytes>,
    iov: Vec<libc::iovec>,
    len: usize,
}

impl IoVecs {
    pub fn new() -> IoVecs {
        IoVecs {
            bufs: Vec::with_capacity(4),
            iov: Vec::with_capacity(4),
            len: 0,
        }
    }

    /// Appends a buffer; empty buffers are skipped.
    pub fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.iov.push(libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        });
        self.len += b.len();
        self.bufs.push(b);
    }

    /// Appends one chunk of a chunked body: size line, data, CRLF.
    pub fn push_chunk(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.push(Bytes::from(format!("{:x}\r\n", data.len())));
        self.push(data);
        self.push(Bytes::from_static(b"\r\n"));
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

// SAFETY: every iovec points into a `Bytes` held in `self.bufs`, which owns (a reference to) that memory for as
// long as `self` lives; `Bytes` never moves or mutates its data, so the pointers stay valid and the bytes stay
// initialised while the runtime owns this value during a write. `iov_len` is exactly each buffer's length, and
// `self.iov` is only appended to, never reallocated while a write is in flight (we own `self` then).
#[allow(unsafe_code)]
unsafe impl IoVecBuf for IoVecs {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov.as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iov.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_lengths() {
        let mut v = IoVecs::new();
        v.push(Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n"));
        v.push(Bytes::new());
        v.push_chunk(Bytes::from_static(b"data: x\n\n"));
        assert_eq!(v.read_iovec_len(), 4);
        assert_eq!(v.len(), 19 + 3 + 9 + 2);
    }
}
