//! Phase 1, parse: read one request (head and body) off a client connection.
//!
//! Owns: the read loop with its three timeouts (idle before the first byte of a request, header timeout for
//! the rest of the head, body timeout for the body), `Expect: 100-continue`, and body assembly: a
//! Content-Length body is split out of the read buffer without copying; a chunked body is decoded into one
//! contiguous buffer (the only copy, bounded by `server.max_body_bytes`).
//!
//! Fails: `Ok(None)` when the client closed or idled out between requests (no response owed); otherwise an
//! [`Error`] (400/408/413/431) that the pipeline renders before closing the connection.
//! Cost: one `httparse` pass; no allocation for a Content-Length body that arrived with its head.

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;

use super::ctx::Core;
use crate::error::{Error, Result};
use crate::net::client::ClientIo;
use crate::net::http1::{self, ChunkEvent, ChunkedDecoder, Framing, RequestHead};

/// Reads more bytes into `io.buf` within `deadline`; `Ok(0)` means the peer closed.
async fn fill(io: &mut ClientIo, deadline: quanta::Instant) -> Result<usize, FillError> {
    let now = quanta::Instant::now();
    let Some(left) = deadline
        .checked_duration_since(now)
        .filter(|d| !d.is_zero())
    else {
        return Err(FillError::Timeout);
    };
    match monoio::time::timeout(left, io.read_more()).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(_)) => Err(FillError::Io),
        Err(_) => Err(FillError::Timeout),
    }
}

enum FillError {
    Timeout,
    Io,
}

/// Reads the next request. `Ok(None)`: the connection is done without a response owed.
pub async fn read_request(core: &Core, io: &mut ClientIo) -> Result<Option<(RequestHead, Bytes)>> {
    let limits = core.limits;
    let mut deadline = quanta::Instant::now() + core.server.idle_timeout;
    let mut started = !io.buf.is_empty();
    if started {
        deadline = quanta::Instant::now() + core.server.header_timeout;
    }
    let head = loop {
        if started {
            if let Some(h) = http1::parse_request(&mut io.buf, &limits)? {
                break h;
            }
        }
        match fill(io, deadline).await {
            Ok(0) if !started => return Ok(None),
            Ok(0) => {
                return Err(Error::bad_request(
                    "connection closed in the middle of a request head",
                ))
            }
            Ok(_) => {
                if !started {
                    started = true;
                    deadline = quanta::Instant::now() + core.server.header_timeout;
                }
            }
            Err(FillError::Timeout) if !started => return Ok(None),
            Err(FillError::Timeout) => {
                return Err(Error::client_timeout("request head not received in time"))
            }
            Err(FillError::Io) => return Ok(None),
        }
    };

    if head.expect_continue && head.framing != Framing::Empty {
        let (r, _) = io.wr.write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]).await;
        if r.is_err() {
            return Ok(None);
        }
    }

    let deadline = quanta::Instant::now() + core.server.body_timeout;
    let body = match head.framing {
        Framing::Empty | Framing::Close => Bytes::new(),
        Framing::Length(n) => {
            let n = n as usize;
            while io.buf.len() < n {
                if io.buf.capacity() < n {
                    let missing = n - io.buf.len();
                    io.buf.reserve(missing);
                }
                match fill(io, deadline).await {
                    Ok(0) | Err(FillError::Io) => {
                        return Err(Error::bad_request(
                            "connection closed before the whole body arrived",
                        ));
                    }
                    Ok(_) => {}
                    Err(FillError::Timeout) => {
                        return Err(Error::client_timeout("request body not received in time"))
                    }
                }
            }
            io.buf.split_to(n).freeze()
        }
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::new();
            let mut body = BytesMut::new();
            loop {
                match decoder.next(&mut io.buf) {
                    Ok(Some(ChunkEvent::Data(d))) => {
                        if body.len() + d.len() > limits.max_body_bytes {
                            return Err(Error::body_too_large(format!(
                                "request body exceeds the {} byte limit",
                                limits.max_body_bytes
                            )));
                        }
                        body.extend_from_slice(&d);
                    }
                    Ok(Some(ChunkEvent::Done)) => break,
                    Ok(None) => match fill(io, deadline).await {
                        Ok(0) | Err(FillError::Io) => {
                            return Err(Error::bad_request(
                                "connection closed before the whole body arrived",
                            ));
                        }
                        Ok(_) => {}
                        Err(FillError::Timeout) => {
                            return Err(Error::client_timeout("request body not received in time"));
                        }
                    },
                    Err(why) => {
                        return Err(Error::bad_request(format!("malformed chunked body: {why}")))
                    }
                }
            }
            body.freeze()
        }
    };
    Ok(Some((head, body)))
}
