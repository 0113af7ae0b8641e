//! Server-sent-event framing of an upstream body, so the client receives whole events as soon as they exist.
//!
//! Owns: finding event boundaries (a blank line: `\n\n`, `\r\r` or `\r\n\r\n`, per the HTML SSE grammar)
//! wherever the network splits them, one byte at a time included, and handing out the complete events as
//! [`Bytes`] without copying when a piece ends on a boundary (the common case: providers flush whole events).
//! Only a piece that ends mid-event is copied, into a small pending buffer, until the rest arrives.
//!
//! Fails: never; bytes are forwarded unchanged, and a stream that ends mid-event flushes what it has.
//! Cost: one backwards scan of each piece for its last boundary (a few ns for a typical 200-byte event).

use bytes::{Bytes, BytesMut};

/// Splits a byte stream into runs of complete SSE events.
#[derive(Debug, Default)]
pub struct SseFramer {
    pending: BytesMut,
}

/// End offset (exclusive) of the last event boundary in `b`, if any.
fn last_boundary(b: &[u8]) -> Option<usize> {
    let mut i = b.len();
    while i >= 2 {
        let (x, y) = (b[i - 2], b[i - 1]);
        if (x == b'\n' && y == b'\n') || (x == b'\r' && y == b'\r') {
            return Some(i);
        }
        if y == b'\n' && x == b'\r' && i >= 4 && b[i - 4] == b'\r' && b[i - 3] == b'\n' {
            return Some(i);
        }
        if y == b'\n' && x == b'\r' && i >= 3 && b[i - 3] == b'\n' {
            // "\n\r\n": a LF-terminated line followed by an empty CRLF line.
            return Some(i);
        }
        i -= 1;
    }
    None
}

impl SseFramer {
    pub fn new() -> Self {
        SseFramer {
            pending: BytesMut::new(),
        }
    }

    /// Adds a piece of the body; returns every complete event now available, in order, as one buffer.
    pub fn push(&mut self, piece: Bytes) -> Option<Bytes> {
        if self.pending.is_empty() {
            match last_boundary(&piece) {
                Some(end) if end == piece.len() => return Some(piece),
                Some(end) => {
                    let out = piece.slice(..end);
                    self.pending.extend_from_slice(&piece[end..]);
                    return Some(out);
                }
                None => {
                    self.pending.extend_from_slice(&piece);
                    return None;
                }
            }
        }
        // Only the bytes around the join can form a new boundary with older pending bytes, so scan from
        // three bytes before the join.
        let join = self.pending.len();
        self.pending.extend_from_slice(&piece);
        let from = join.saturating_sub(3);
        let end = last_boundary(&self.pending[from..]).map(|e| e + from)?;
        Some(self.pending.split_to(end).freeze())
    }

    /// Bytes of an unfinished event, handed out when the stream ends.
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.pending.is_empty() {
            None
        } else {
            Some(self.pending.split().freeze())
        }
    }

    /// Bytes held back waiting for the end of an event.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

/// Splits a run of complete events at blank lines (`\n\n`, `\r\r`, `\r\n\r\n`); each event keeps its
/// terminator.
pub fn split_events(run: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = run;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut i = 0;
        while i + 1 < rest.len() {
            let (a, b) = (rest[i], rest[i + 1]);
            let end = if a == b'\n' && b == b'\n'
                || a == b'\r' && b == b'\r' && rest.get(i + 2) != Some(&b'\n')
            {
                Some(i + 2)
            } else if a == b'\r'
                && b == b'\n'
                && rest.get(i + 2) == Some(&b'\r')
                && rest.get(i + 3) == Some(&b'\n')
            {
                Some(i + 4)
            } else {
                None
            };
            if let Some(end) = end {
                let (ev, tail) = rest.split_at(end);
                rest = tail;
                return Some(ev);
            }
            i += 1;
        }
        let ev = rest;
        rest = &[];
        Some(ev)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events_of(out: &[Bytes]) -> Vec<u8> {
        out.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[test]
    fn whole_events_pass_through_without_copy() {
        let mut f = SseFramer::new();
        let piece = Bytes::from_static(b"data: {\"a\":1}\n\n");
        let out = f.push(piece.clone()).unwrap();
        assert_eq!(out.as_ptr(), piece.as_ptr());
        assert_eq!(f.pending_len(), 0);
    }

    #[test]
    fn every_split_yields_only_complete_events() {
        for stream in [
            &b"event: message_start\ndata: {\"x\":1}\n\nevent: ping\ndata: {}\n\ndata: [DONE]\n\n"
                [..],
            b"data: a\r\n\r\ndata: b\r\n\r\n",
            b"data: a\r\rdata: b\r\r",
        ] {
            for size in 1..stream.len() {
                let mut f = SseFramer::new();
                let mut out = Vec::new();
                for piece in stream.chunks(size) {
                    if let Some(b) = f.push(Bytes::copy_from_slice(piece)) {
                        let last = *b.last().unwrap();
                        assert!(
                            last == b'\n' || last == b'\r',
                            "split {size}: chunk ends mid-event"
                        );
                        out.push(b);
                    }
                }
                assert_eq!(f.finish(), None, "split {size}");
                assert_eq!(events_of(&out), stream, "split {size}");
            }
        }
    }

    #[test]
    fn unfinished_tail_is_flushed_at_the_end() {
        let mut f = SseFramer::new();
        assert_eq!(
            f.push(Bytes::from_static(b"data: 1\n\ndata: {\"trunc"))
                .unwrap(),
            &b"data: 1\n\n"[..]
        );
        assert_eq!(f.finish().unwrap(), &b"data: {\"trunc"[..]);
    }
}
