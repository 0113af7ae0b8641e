//! Phase 7, forward: send the request to the provider and stream the response back as it arrives.
//!
//! Owns: the upstream request head (the client's credentials and hop-by-hop headers removed, the provider's
//! key and its API's default headers injected, a request id added), the upstream exchange on a pooled or fresh connection (one retry on a
//! fresh connection when a pooled one turns out to be closed before any response byte), response header
//! filtering, and body relay: a Content-Length body is passed through piece by piece; a chunked or
//! close-delimited body is re-chunked toward the client, and an event stream is cut at SSE event boundaries
//! ([`SseFramer`]) so every chunk the client receives holds whole events, sent the moment they are complete.
//!
//! While it waits on the upstream it also watches the client socket: a client that disconnects cancels the
//! upstream request at once (the upstream connection is dropped), instead of running the generation to the end.
//!
//! Fails: before the response head, with an [`Error`] (502 unreachable or malformed, 504 timeout) that the
//! pipeline renders; after it, an upstream failure ends the client's stream cleanly (an error event in the
//! client's API shape, then the terminating chunk) and the outcome is logged as `upstream_failed`.
//! Cost: per request two writes upstream (head, body: the body is a refcount of the client's buffer), one
//! write per group of complete events downstream.

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use super::ctx::{Core, Outcome, Relayed, RequestCtx};
use crate::error::{Error, Result};
use crate::net::client::ClientGone;
use crate::net::client::ClientIo;
use crate::net::http1::{self, ChunkEvent, ChunkedDecoder, Framing, ResponseHead};
use crate::net::iovec::IoVecs;
use crate::net::sse::SseFramer;
use crate::net::upstream::{self, UpConn};
use crate::providers::meter::UsageMeter;
use crate::providers::Api;
use crate::runtime::snapshot::ProviderRuntime;

const READ_SPARE: usize = 16 * 1024;
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Request headers never forwarded upstream: hop-by-hop (RFC 9110 §7.6.1), framing (re-computed), the
/// client's credentials (Tollgate injects the provider's), and ones Tollgate sets itself.
fn drop_request_header(name: &[u8]) -> bool {
    const DROP: &[&str] = &[
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "authorization",
        "x-api-key",
        "api-key",
        "cf-access-jwt-assertion",
        "cookie",
        "accept-encoding",
        "x-request-id",
    ];
    DROP.iter().any(|d| name.eq_ignore_ascii_case(d.as_bytes()))
}

/// Response headers never relayed to the client (hop-by-hop and framing, which Tollgate sets).
fn drop_response_header(name: &[u8]) -> bool {
    const DROP: &[&str] = &[
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "x-request-id",
    ];
    DROP.iter().any(|d| name.eq_ignore_ascii_case(d.as_bytes()))
}

/// Names listed in a `Connection` header are hop-by-hop too.
fn connection_listed(head_headers: &mut dyn Iterator<Item = (&[u8], &[u8])>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (n, v) in head_headers {
        if n.eq_ignore_ascii_case(b"connection") {
            for t in v.split(|&b| b == b',') {
                let t = t.trim_ascii();
                if !t.is_empty() {
                    out.push(t.to_ascii_lowercase());
                }
            }
        }
    }
    out
}

fn build_request_head(ctx: &RequestCtx, p: &ProviderRuntime, body_len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(512 + ctx.head.raw.len());
    h.extend_from_slice(b"POST ");
    h.extend_from_slice(p.base.path_prefix.as_bytes());
    // The endpoint's `/v1` path, also when the client called its alias without `/v1`.
    let path = match ctx.endpoint {
        Some(ep) => ep.upstream_path(),
        None => ctx.head.path(),
    };
    h.extend_from_slice(path.as_bytes());
    h.extend_from_slice(b" HTTP/1.1\r\n");
    h.extend_from_slice(&p.host_line);
    h.extend_from_slice(p.auth_lines());
    h.extend_from_slice(format!("content-length: {body_len}\r\n").as_bytes());
    h.extend_from_slice(b"accept-encoding: identity\r\nx-request-id: ");
    h.extend_from_slice(ctx.id.as_bytes());
    h.extend_from_slice(b"\r\n");
    let listed = connection_listed(&mut ctx.head.headers());
    // The API's default headers (e.g. its version) go up unless the client sent its own: bit i for the i-th.
    let defaults = p.api.default_headers();
    let mut sent = 0u64;
    for (n, v) in ctx.head.headers() {
        if drop_request_header(n) || listed.iter().any(|l| n.eq_ignore_ascii_case(l)) {
            continue;
        }
        for (i, (d, _)) in defaults.iter().enumerate() {
            if n.eq_ignore_ascii_case(d.as_bytes()) {
                sent |= 1 << i;
            }
        }
        h.extend_from_slice(n);
        h.extend_from_slice(b": ");
        h.extend_from_slice(v);
        h.extend_from_slice(b"\r\n");
    }
    for (i, (d, v)) in defaults.iter().enumerate() {
        if sent & (1 << i) == 0 {
            h.extend_from_slice(d.as_bytes());
            h.extend_from_slice(b": ");
            h.extend_from_slice(v.as_bytes());
            h.extend_from_slice(b"\r\n");
        }
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// Why the relay stopped early.
enum Stop {
    ClientGone,
    Upstream(Error),
    /// A budget's stream cut-off ended the stream; the client got its protocol's final events.
    CutOff,
}

/// Forwards the request. `Err` only when nothing was written to the client yet.
pub async fn forward(
    core: &Core,
    ctx: &mut RequestCtx,
    io: &mut ClientIo,
    provider: &ProviderRuntime,
    body: Bytes,
    strip_usage: bool,
) -> Result<()> {
    let head = Bytes::from(build_request_head(ctx, provider, body.len()));
    // The client's next read goes in flight now: it watches for a disconnect while we wait on the upstream,
    // and stays pending afterwards as the read of the next request.
    io.watch();
    exchange(core, ctx, io, provider, head, body, strip_usage).await
}

async fn exchange(
    core: &Core,
    ctx: &mut RequestCtx,
    io: &mut ClientIo,
    provider: &ProviderRuntime,
    head: Bytes,
    body: Bytes,
    strip_usage: bool,
) -> Result<()> {
    let sent_at = quanta::Instant::now();
    let mut attempt = 0;
    let (mut conn, resp, mut ubuf) = loop {
        attempt += 1;
        let pooled = if attempt == 1 {
            core.pool.take(&provider.pool_key)
        } else {
            None
        };
        let (mut conn, reused) = match pooled {
            Some(c) => (c, true),
            None => {
                let c = io
                    .guard(upstream::connect(
                        provider,
                        core.pool.next_rr(),
                        core.upstream.connect_timeout,
                    ))
                    .await;
                match c {
                    Ok(r) => (r?, false),
                    Err(ClientGone) => return client_gone(ctx),
                }
            }
        };
        match io
            .guard(send_and_read_head(
                core,
                &mut conn,
                head.clone(),
                body.clone(),
            ))
            .await
        {
            Err(ClientGone) => return client_gone(ctx),
            Ok(Ok((resp, ubuf))) => break (conn, resp, ubuf),
            Ok(Err(SendError { stale: true, .. })) if reused => continue,
            Ok(Err(SendError { error, .. })) => return Err(error),
        }
    };
    ctx.upstream_ttfb = Some(quanta::Instant::now().duration_since(sent_at));
    ctx.upstream_sent = Some(sent_at.duration_since(ctx.start));
    ctx.status = resp.status;

    let sse = resp.is_event_stream();
    // The endpoint's API reads the response (embeddings are served by an OpenAI provider).
    let mut tap = Tap::new(
        ctx.api,
        sse,
        (200..300).contains(&resp.status),
        strip_usage && sse,
    );
    if sse && (200..300).contains(&resp.status) {
        tap.cutoff = ctx
            .cutoff_tokens
            .map(|cap| crate::spend::cutoff::StreamCutoff::new(ctx.api, cap));
    }
    // A successful non-streamed answer is read whole before it is relayed (the client waits for all of it
    // anyway), so its cost can travel in the response head as `x-tollgate-cost`.
    let mut cost_header = None;
    if let (Framing::Length(n), Some(json)) = (resp.framing, tap.json.as_ref()) {
        if n <= MAX_USAGE_BODY as u64 && json.is_empty() {
            while (ubuf.len() as u64) < n {
                let read = io
                    .guard(monoio::time::timeout(
                        core.upstream.read_timeout,
                        conn.read_append(std::mem::take(&mut ubuf), READ_SPARE),
                    ))
                    .await;
                match read {
                    Err(ClientGone) => return client_gone(ctx),
                    Ok(Err(_)) => {
                        return Err(Error::upstream_timeout("the provider stalled mid-response"))
                    }
                    Ok(Ok((Ok(0), _))) | Ok(Ok((Err(_), _))) => {
                        return Err(Error::upstream_protocol(
                            "the provider closed the connection mid-response",
                        ))
                    }
                    Ok(Ok((Ok(_), b))) => ubuf = b,
                }
            }
            tap.read_whole_json(&ubuf[..n as usize]);
            if let (Some(q), Some(u)) = (ctx.quote, tap.meter.usage()) {
                cost_header = Some(q.cost(&u).effective);
            }
        }
    }

    // Response head toward the client.
    let client_chunked = !matches!(resp.framing, Framing::Length(_) | Framing::Empty);
    let mut out = Vec::with_capacity(resp.raw.len() + 128);
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            resp.status,
            http1::reason(resp.status)
        )
        .as_bytes(),
    );
    let listed = connection_listed(&mut resp.headers());
    for (n, v) in resp.headers() {
        if n.eq_ignore_ascii_case(b"x-request-id") {
            // Keep the provider's id for support tickets, under a name that does not collide with ours.
            out.extend_from_slice(b"x-upstream-request-id: ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
            continue;
        }
        if drop_response_header(n) || listed.iter().any(|l| n.eq_ignore_ascii_case(l)) {
            continue;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(ctx.id.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&super::admit::header_lines(ctx));
    if let Some(cost) = cost_header {
        // The effective (negotiated) cost of this request in USD, exact.
        out.extend_from_slice(b"x-tollgate-cost: ");
        out.extend_from_slice(cost.usd().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match resp.framing {
        Framing::Length(n) => out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        Framing::Empty => out.extend_from_slice(b"content-length: 0\r\n"),
        Framing::Chunked | Framing::Close => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n")
        }
    }
    if !ctx.keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let mut batch = IoVecs::new();
    batch.push(Bytes::from(out));

    let relay = relay_body(
        core,
        ctx,
        io,
        &mut conn,
        &resp,
        &mut ubuf,
        sse,
        client_chunked,
        batch,
        &mut tap,
    )
    .await;
    if ctx.account.is_none() {
        let (meter, relayed) = tap.finish();
        ctx.meter = Some(meter);
        ctx.relayed = relayed;
    }
    match relay {
        Ok(reusable) => {
            ctx.outcome = Outcome::Complete;
            if reusable && resp.keep_alive && ubuf.is_empty() {
                core.pool.put(&provider.pool_key, conn);
            }
        }
        Err(Stop::ClientGone) => {
            // Dropping `conn` closes the upstream socket: the provider stops generating.
            ctx.outcome = Outcome::ClientGone;
            ctx.keep_alive = false;
        }
        // The client's stream ended well-formed; dropping `conn` stops the provider.
        Err(Stop::CutOff) => {
            ctx.outcome = Outcome::CutOff;
            if !client_chunked {
                // Its length was the upstream's (or the connection's end): only a close delimits it now.
                ctx.keep_alive = false;
            }
        }
        Err(Stop::Upstream(e)) => {
            ctx.outcome = Outcome::UpstreamFailed;
            ctx.keep_alive = false;
            if client_chunked {
                // End the stream cleanly: an error event the SDKs surface, then the last chunk.
                let mut tail = IoVecs::new();
                if sse {
                    tail.push_chunk(Bytes::from(ctx.api.stream_error_event(&e)));
                }
                tail.push(Bytes::from_static(b"0\r\n\r\n"));
                let _ = flush(ctx, &mut io.wr, tail).await;
            }
            ctx.error = Some(e);
        }
    }
    Ok(())
}

fn client_gone(ctx: &mut RequestCtx) -> Result<()> {
    ctx.outcome = Outcome::ClientGone;
    ctx.keep_alive = false;
    if ctx.status == 0 {
        // Nginx's convention for "client closed request"; never sent, only logged.
        ctx.status = 499;
    }
    Ok(())
}

struct SendError {
    /// The connection was closed by the upstream before any response byte: safe to retry on a fresh one.
    stale: bool,
    error: Error,
}

async fn send_and_read_head(
    core: &Core,
    conn: &mut UpConn,
    head: Bytes,
    body: Bytes,
) -> std::result::Result<(ResponseHead, BytesMut), SendError> {
    // Head and body in one vectored write: one send, and the body is the client's buffer, not a copy.
    let mut req = IoVecs::new();
    req.push(head);
    req.push(body);
    let sent = match conn.write_vectored_all(req).await.0 {
        Ok(_) => conn.flush().await,
        Err(e) => Err(e),
    };
    if let Err(e) = sent {
        return Err(SendError {
            stale: true,
            error: Error::upstream_unreachable(format!("sending request: {e}")),
        });
    }
    let deadline = quanta::Instant::now() + core.upstream.first_byte_timeout;
    let mut ubuf = BytesMut::with_capacity(READ_SPARE);
    loop {
        let left = deadline
            .checked_duration_since(quanta::Instant::now())
            .unwrap_or_default();
        if left.is_zero() {
            return Err(SendError {
                stale: false,
                error: Error::upstream_timeout("the provider did not answer in time"),
            });
        }
        let had = ubuf.len();
        let (r, b) = match monoio::time::timeout(
            left,
            conn.read_append(std::mem::take(&mut ubuf), READ_SPARE),
        )
        .await
        {
            Ok(v) => v,
            Err(_) => {
                return Err(SendError {
                    stale: false,
                    error: Error::upstream_timeout("the provider did not answer in time"),
                });
            }
        };
        ubuf = b;
        match r {
            Ok(0) | Err(_) if had == 0 => {
                return Err(SendError {
                    stale: true,
                    error: Error::upstream_unreachable(
                        "the provider closed the connection without answering",
                    ),
                });
            }
            Ok(0) | Err(_) => {
                return Err(SendError {
                    stale: false,
                    error: Error::upstream_protocol(
                        "the provider closed the connection mid-response-head",
                    ),
                });
            }
            Ok(_) => {}
        }
        loop {
            match http1::parse_response(&mut ubuf, MAX_RESPONSE_HEAD) {
                Ok(Some(resp)) if (100..200).contains(&resp.status) && resp.status != 101 => {
                    continue
                }
                Ok(Some(resp)) if resp.status == 101 => {
                    return Err(SendError {
                        stale: false,
                        error: Error::upstream_protocol("the provider switched protocols"),
                    });
                }
                Ok(Some(resp)) => return Ok((resp, ubuf)),
                Ok(None) => break,
                Err(error) => {
                    return Err(SendError {
                        stale: false,
                        error,
                    })
                }
            }
        }
    }
}

/// Relays the body, starting with `batch` (the response head). Everything available after each upstream read
/// goes out in one vectored write. `Ok(true)` when the upstream connection ended cleanly and may be pooled.
/// On `Err`, everything framed so far (the head included) has been written.
#[allow(clippy::too_many_arguments)]
async fn relay_body(
    core: &Core,
    ctx: &mut RequestCtx,
    io: &mut ClientIo,
    conn: &mut UpConn,
    resp: &ResponseHead,
    ubuf: &mut BytesMut,
    sse: bool,
    client_chunked: bool,
    mut batch: IoVecs,
    tap: &mut Tap,
) -> std::result::Result<bool, Stop> {
    let mut framer = sse.then(SseFramer::new);
    let mut decoder = (resp.framing == Framing::Chunked).then(ChunkedDecoder::new);
    let mut remaining = match resp.framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let add = |batch: &mut IoVecs, framer: &mut Option<SseFramer>, tap: &mut Tap, piece: Bytes| {
        let out = match framer.as_mut() {
            Some(f) => match f.push(piece) {
                Some(events) => events,
                None => return,
            },
            None => piece,
        };
        let Some(out) = tap.pass(out) else { return };
        if client_chunked {
            batch.push_chunk(out);
        } else {
            batch.push(out);
        }
    };
    loop {
        // Frame what is buffered.
        let mut finished = false;
        let mut failure = None;
        match resp.framing {
            Framing::Length(_) => {
                if !ubuf.is_empty() {
                    let take = (remaining as usize).min(ubuf.len());
                    add(&mut batch, &mut framer, tap, ubuf.split_to(take).freeze());
                    remaining -= take as u64;
                }
                finished = remaining == 0;
            }
            Framing::Close => {
                if !ubuf.is_empty() {
                    add(&mut batch, &mut framer, tap, ubuf.split().freeze());
                }
            }
            Framing::Chunked => {
                if let Some(d) = decoder.as_mut() {
                    loop {
                        match d.next(ubuf) {
                            Ok(Some(ChunkEvent::Data(b))) => add(&mut batch, &mut framer, tap, b),
                            Ok(Some(ChunkEvent::Done)) => {
                                finished = true;
                                break;
                            }
                            Ok(None) => break,
                            Err(why) => {
                                failure = Some(Error::upstream_protocol(format!(
                                    "the provider sent a malformed chunked body: {why}"
                                )));
                                break;
                            }
                        }
                    }
                }
            }
            Framing::Empty => finished = true,
        }
        if let Some(c) = tap.cutoff.as_ref().filter(|c| c.reached()) {
            // Cut at the reservation: the final events of the client's protocol, then the last chunk.
            if client_chunked {
                batch.push_chunk(Bytes::from(c.tail()));
                batch.push(Bytes::from_static(b"0\r\n\r\n"));
            } else {
                batch.push(Bytes::from(c.tail()));
            }
            settle_before_last_bytes(core, ctx, tap).await;
            flush(ctx, &mut io.wr, batch).await?;
            return Err(Stop::CutOff);
        }
        if finished {
            if let Some(rest) = framer
                .as_mut()
                .and_then(SseFramer::finish)
                .and_then(|r| tap.pass(r))
            {
                if client_chunked {
                    batch.push_chunk(rest);
                } else {
                    batch.push(rest);
                }
            }
            if client_chunked {
                if sse {
                    if let Some(comment) = cost_comment(ctx, tap) {
                        batch.push_chunk(comment);
                    }
                }
                batch.push(Bytes::from_static(b"0\r\n\r\n"));
            }
            settle_before_last_bytes(core, ctx, tap).await;
            flush(ctx, &mut io.wr, batch).await?;
            return Ok(true);
        }
        flush(ctx, &mut io.wr, std::mem::take(&mut batch)).await?;
        if let Some(e) = failure {
            return Err(Stop::Upstream(e));
        }
        // Read more, within the read timeout, unless the client leaves.
        let read = io
            .guard(monoio::time::timeout(
                core.upstream.read_timeout,
                conn.read_append(std::mem::take(ubuf), READ_SPARE),
            ))
            .await
            .map_err(|ClientGone| Stop::ClientGone)?;
        match read {
            Err(_) => {
                return Err(Stop::Upstream(Error::upstream_timeout(
                    "the provider stalled mid-response",
                )))
            }
            Ok((Ok(0), b)) | Ok((Err(_), b)) => {
                *ubuf = b;
                if resp.framing == Framing::Close {
                    if let Some(rest) = framer
                        .as_mut()
                        .and_then(SseFramer::finish)
                        .and_then(|r| tap.pass(r))
                    {
                        batch.push_chunk(rest);
                    }
                    batch.push(Bytes::from_static(b"0\r\n\r\n"));
                    settle_before_last_bytes(core, ctx, tap).await;
                    flush(ctx, &mut io.wr, batch).await?;
                    return Ok(false);
                }
                return Err(Stop::Upstream(Error::upstream_protocol(
                    "the provider closed the connection mid-response",
                )));
            }
            Ok((Ok(_), b)) => *ubuf = b,
        }
    }
}

/// Reads usage off the relayed body without holding it up: SSE events go to the meter as they pass; a
/// successful JSON body is gathered (a copy, capped) and parsed once it is complete. It also keeps what it
/// relayed (refcounts of the same buffers, capped at `MAX_KEPT`) until the end, for the estimate path when
/// the provider's usage never arrives.
pub struct Tap {
    api: Api,
    meter: UsageMeter,
    sse: bool,
    json: Option<Vec<u8>>,
    /// Remove the usage Tollgate requested on the client's behalf (see `route::request_usage`).
    strip_usage: bool,
    kept: Vec<Bytes>,
    kept_bytes: usize,
    dropped_bytes: u64,
    /// A budget's stream cut-off, counting the stream's visible output.
    cutoff: Option<crate::spend::cutoff::StreamCutoff>,
}

/// Larger non-streamed bodies are not parsed for usage (the account phase then estimates).
const MAX_USAGE_BODY: usize = 8 * 1024 * 1024;

/// Relayed bytes kept per request for a possible estimate.
const MAX_KEPT: usize = 256 * 1024;

impl Tap {
    fn new(api: Api, sse: bool, success: bool, strip_usage: bool) -> Tap {
        Tap {
            api,
            meter: UsageMeter::new(api),
            sse,
            json: (!sse && success).then(Vec::new),
            strip_usage,
            kept: Vec::new(),
            kept_bytes: 0,
            dropped_bytes: 0,
            cutoff: None,
        }
    }

    fn keep(&mut self, b: &Bytes) {
        if self.kept_bytes + b.len() <= MAX_KEPT {
            self.kept_bytes += b.len();
            self.kept.push(b.clone());
        } else {
            self.dropped_bytes += b.len() as u64;
        }
    }

    /// Observes what is about to be relayed and returns what the client should get.
    fn pass(&mut self, out: Bytes) -> Option<Bytes> {
        let out = match self.cutoff.as_mut() {
            Some(c) => {
                let out = c.admit(out, &self.kept);
                if out.is_empty() {
                    return None;
                }
                out
            }
            None => out,
        };
        self.observe(&out);
        if self.sse {
            self.keep(&out);
        }
        if self.strip_usage {
            self.api.strip_stream_usage(out)
        } else {
            Some(out)
        }
    }

    fn observe(&mut self, out: &[u8]) {
        if self.sse {
            self.meter.observe_events(out);
        } else if let Some(j) = &mut self.json {
            if j.len() + out.len() <= MAX_USAGE_BODY {
                j.extend_from_slice(out);
            } else {
                self.json = None;
            }
        }
    }

    /// Parses a whole JSON body read ahead of the relay; the relay then passes it on without gathering it again.
    fn read_whole_json(&mut self, body: &[u8]) {
        self.meter.observe_json(body);
        if self.meter.usage().is_none() {
            self.keep(&Bytes::copy_from_slice(body));
        }
        self.json = None;
    }

    /// What the account phase needs: the meter and what was relayed. The tap is left empty (a second call
    /// returns an empty meter).
    fn finish(&mut self) -> (UsageMeter, Relayed) {
        if let Some(j) = self.json.take() {
            self.meter.observe_json(&j);
            if self.meter.usage().is_none() {
                self.keep(&Bytes::from(j));
            }
        }
        let meter = std::mem::replace(&mut self.meter, UsageMeter::new(self.api));
        let mut kept = std::mem::take(&mut self.kept);
        if meter.usage().is_some() {
            kept.clear();
        }
        let relayed = Relayed {
            kept,
            dropped_bytes: std::mem::take(&mut self.dropped_bytes),
            counted_output: self
                .cutoff
                .as_ref()
                .filter(|c| c.reached())
                .map(|c| c.tokens()),
        };
        self.kept_bytes = 0;
        (meter, relayed)
    }
}

/// Settles the request before its last bytes go to the client, and waits until the settlement's journal
/// line is written (see `crate::spend::journal`: a response the client saw complete is never lost to a
/// crash). The wait is the core's group commit: one `write(2)` for every request settling in this tick.
async fn settle_before_last_bytes(core: &Core, ctx: &mut RequestCtx, tap: &mut Tap) {
    let (meter, relayed) = tap.finish();
    ctx.meter = Some(meter);
    ctx.relayed = relayed;
    super::account::settle(core, ctx);
    core.budgets.journal_durable().await;
}

/// The cost of a completed stream, as its last bytes: an SSE comment line (`: tollgate-cost=USD`), which
/// every SSE parser ignores by the spec (the official SDKs included), so streams stay what clients asked for
/// while a client that wants the cost can read it. Only when the provider reported usage.
fn cost_comment(ctx: &RequestCtx, tap: &Tap) -> Option<Bytes> {
    let cost = ctx.quote?.cost(&tap.meter.usage()?).effective;
    Some(Bytes::from(format!(": tollgate-cost={}\n\n", cost.usd())))
}

/// Writes a batch to the client with one vectored write.
async fn flush(
    ctx: &mut RequestCtx,
    wr: &mut monoio::io::OwnedWriteHalf<TcpStream>,
    batch: IoVecs,
) -> std::result::Result<(), Stop> {
    if batch.is_empty() {
        return Ok(());
    }
    let n = batch.len();
    let (r, _) = wr.write_vectored_all(batch).await;
    r.map_err(|_| Stop::ClientGone)?;
    ctx.bytes_out += n as u64;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_credentials_are_dropped() {
        for h in [
            "Authorization",
            "X-Api-Key",
            "cf-access-jwt-assertion",
            "Transfer-Encoding",
            "connection",
            "TE",
        ] {
            assert!(drop_request_header(h.as_bytes()), "{h}");
        }
        for h in [
            "content-type",
            "anthropic-version",
            "openai-beta",
            "user-agent",
        ] {
            assert!(!drop_request_header(h.as_bytes()), "{h}");
        }
    }
}
