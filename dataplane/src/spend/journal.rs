//! The spend journal: each core appends every settlement to its own file before the response's last byte
//! goes to the client, and hands the same settlement to the ledger thread ([`crate::spend::committer`]) over a
//! crossbeam channel. The ledger thread commits settlements to the store in batches; the journal is what
//! makes a settlement survive the process: after `kill -9`, the next start replays every journal entry the
//! store has not applied yet.
//!
//! Owns: [`Journal`] (one per core: its file, its sequence numbers, its sender), the file format of a
//! [`Record`] (the record itself is [`crate::spend::records`]'s: one JSON line
//! `{"q":seq,"t":unix_ms,"a":"pico_usd","k":[[budget, member], ...],"u":{..}}`, where `u` is the request's
//! usage and dimensions (see `LineUsage`): lines written before it existed have none and replay as spend
//! only; an older binary ignores it), and [`read_file`] (for replay and for the ledger thread's catch-up when the channel was full).
//!
//! Reservations: at admission, before the request is forwarded, [`Journal::reserve`] appends
//! `{"r":id,"t":unix_ms,"a":"pico_usd","k":[...]}` (the amount held on each instance); the settlement line
//! closes it with `"c":id`, a release (or a $0 settlement) with a line `{"c":id}`. Ids are numbered apart
//! from settlement sequence numbers (the ledger thread never sees reservations). [`read_entries`] reads all
//! three kinds back and [`unsettled`] finds the reservations a crashed run left open, which the next start
//! charges at their reserved amount (a crash never under-counts). Open reservations are copied into a
//! rotated file, so deleting a wholly committed file never loses one.
//!
//! Guarantee: a line is written with `write(2)` to a file opened with `O_APPEND` before the request moves
//! on: before the request is forwarded (its reservation) and before the response's last bytes (its
//! settlement), the core awaits [`Journal::durable`]. Once written, the entry is in the kernel's page
//! cache, which a process crash (`kill -9`, a panic, OOM) cannot lose; a machine crash or power loss can
//! lose what the ledger thread has not yet `fsync`ed (at most one second: it syncs the journals once a
//! second). Group commit: on a core, appends only buffer their line; the first waiter of a batch spawns
//! a flush task, which the runtime queues behind the tasks already ready, so every line they append joins
//! one `write(2)` (a request alone on its core writes at once: nothing could join it); lines nobody
//! awaits (releases, requests whose client left) go with the next batch or the core's 50 ms tick. A settlement reaches the ledger thread only after its line is written: the
//! store never holds spend that a crash could leave without its line (replay would charge the
//! reservation again).
//! Sources: each core of each process run writes its own source (`{run}-c{core}`), in files rotated every
//! [`ROTATE_BYTES`] (`{source}.{first_seq}.log`), so sequence numbers identify entries without locks.
//!
//! Fails: an append that cannot be written (disk full, I/O error) is reported and marks the journal
//! failed: budgets with `on_store_failure = "closed"` then refuse new spend on this core (the settlement
//! itself still goes to the ledger thread and the in-memory ledger). A full channel drops only the hand-off:
//! the ledger thread sees the gap in sequence numbers and reads the missing entries from the file. A torn
//! last line (a crash mid-append, before the client could have seen its response end) is ignored on replay.
//! Cost: one small JSON format per settled request (bench `admission`: `journal_append`) and one more per
//! admitted request for its reservation (`journal_reserve_then_settle`); one `write(2)` per batch: two
//! per request at low rates, about 0.2 per request at saturation (16 connections on one core,
//! docs/benchmarks.md), where the writes were ~5% of the core's samples before.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use crossbeam_channel::Sender;
use jiff::Timestamp;
use tollgate_core::budget::InstanceKey;
use tollgate_core::pricing::Cost;
use tollgate_core::store::ledger::InstanceName;
use tollgate_core::{Identity, IdentityKind, Money, Usage};

use crate::spend::records::{instance_name, Metered, Record, ToLedger};

/// A journal file is rotated past this size.
pub const ROTATE_BYTES: u64 = 64 * 1024 * 1024;

/// One journal line. A settlement has `q` (and `c` when it closes a reservation), a reservation has `r`,
/// a release (or a settlement at $0) has only `c`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Line<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    q: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    a: Option<String>,
    #[serde(borrow, default, skip_serializing_if = "Vec::is_empty")]
    k: Vec<(std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>,
    /// The request's usage (absent in lines written before usage was journaled, and in reservations).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    u: Option<LineUsage<'a>>,
}

type Text<'a> = std::borrow::Cow<'a, str>;

/// A settlement line's usage: `{"p":provider,"m":model,"ik":kind,"is":source,"id":subject,"g":[groups],
/// "at":[[key,value],..],"c":"effective_pico","l":"list_pico","n":[input,cached_input,cache_write_5m,
/// cache_write_1h,output,reasoning],"e":estimated}`.
#[derive(serde::Serialize, serde::Deserialize)]
struct LineUsage<'a> {
    #[serde(borrow)]
    p: Text<'a>,
    #[serde(borrow)]
    m: Text<'a>,
    #[serde(borrow)]
    ik: Text<'a>,
    #[serde(borrow)]
    is: Text<'a>,
    #[serde(borrow)]
    id: Text<'a>,
    #[serde(borrow, default, skip_serializing_if = "Vec::is_empty")]
    g: Vec<Text<'a>>,
    #[serde(borrow, default, skip_serializing_if = "Vec::is_empty")]
    at: Vec<(Text<'a>, Text<'a>)>,
    c: String,
    l: String,
    n: [u64; 6],
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    e: bool,
}

impl<'a> LineUsage<'a> {
    fn of(m: &'a Metered) -> LineUsage<'a> {
        let u = &m.usage;
        LineUsage {
            p: Text::Borrowed(&m.provider),
            m: Text::Borrowed(&m.model),
            ik: Text::Borrowed(m.identity.kind.as_str()),
            is: Text::Borrowed(&m.identity.source),
            id: Text::Borrowed(&m.identity.subject),
            g: m.identity
                .groups
                .iter()
                .map(|g| Text::Borrowed(&**g))
                .collect(),
            at: m
                .attributes
                .iter()
                .map(|(k, v)| (Text::Borrowed(k.as_str()), Text::Borrowed(v.as_str())))
                .collect(),
            c: m.cost.effective.pico().to_string(),
            l: m.cost.list.pico().to_string(),
            n: [
                u.input_tokens,
                u.cached_input_tokens,
                u.cache_write_5m_tokens,
                u.cache_write_1h_tokens,
                u.output_tokens,
                u.reasoning_tokens,
            ],
            e: u.estimated,
        }
    }

    /// The usage back; `None` when an amount does not parse.
    fn into_metered(self) -> Option<Metered> {
        let kind = match &*self.ik {
            "user" => IdentityKind::User,
            "service" => IdentityKind::Service,
            _ => IdentityKind::Anonymous,
        };
        let shared = |t: Text<'_>| std::sync::Arc::<str>::from(&*t);
        let groups: Vec<std::sync::Arc<str>> = self.g.into_iter().map(shared).collect();
        let [input, cached, w5, w1, output, reasoning] = self.n;
        Some(Metered {
            identity: Identity {
                kind,
                subject: shared(self.id),
                email: None,
                groups: std::sync::Arc::from(groups),
                source: shared(self.is),
                token_id: None,
                attributes: std::sync::Arc::from(Vec::new()),
            },
            provider: shared(self.p),
            model: shared(self.m),
            attributes: self
                .at
                .into_iter()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
            usage: Usage {
                input_tokens: input,
                cached_input_tokens: cached,
                cache_write_5m_tokens: w5,
                cache_write_1h_tokens: w1,
                output_tokens: output,
                reasoning_tokens: reasoning,
                estimated: self.e,
            },
            cost: Cost {
                list: Money::from_pico(self.l.parse().ok()?),
                effective: Money::from_pico(self.c.parse().ok()?),
            },
        })
    }
}

/// One entry of a journal file, as [`read_entries`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A settlement (sequence `seq`), closing reservation `closes` when it has one.
    Settled { record: Record, closes: Option<u64> },
    /// A reservation held at admission: `amount` on each of `instances`, the most the request can cost.
    Reserved {
        id: u64,
        at: Timestamp,
        amount: Money,
        instances: Vec<InstanceName>,
    },
    /// Reservation `id` released unsettled (the request never reached a provider) or settled at $0.
    Closed(u64),
}

/// One core's journal.
#[derive(Debug)]
pub struct Journal {
    source: std::sync::Arc<str>,
    dir: PathBuf,
    file: RefCell<Option<std::fs::File>>,
    written: Cell<u64>,
    /// A file is rotated past this many bytes ([`ROTATE_BYTES`]; smaller in tests).
    rotate: u64,
    seq: Cell<u64>,
    /// The last reservation id handed out (its own numbering: reservations are not settlements, and the
    /// ledger thread never sees them).
    rid: Cell<u64>,
    /// The lines of the reservations not yet closed, by id: copied into the next file at rotation, so a
    /// deleted (wholly committed) file never takes an open reservation with it.
    open: RefCell<HashMap<u64, Vec<u8>>>,
    failed: Cell<bool>,
    /// Set when a flush changed whether appends fail: `Err(why)` when they started failing, `Ok(())` when
    /// they work again (taken by the core, which logs it once).
    transition: RefCell<Option<Result<(), String>>>,
    tx: Sender<ToLedger>,
    /// Lines appended and not yet written (group commit, see [`Journal::durable`]).
    batch: RefCell<Batch>,
    /// Whether appends wait for [`Journal::durable`] or the core's tick ([`Journal::set_batched`]); off,
    /// every append is written at once.
    batched: Cell<bool>,
    /// Lines appended in all, and lines written (or given up on after a failed write).
    appended: Cell<u64>,
    durable: Cell<u64>,
    /// A flush is arranged ([`Journal::schedule_flush`]).
    flush_scheduled: Cell<bool>,
    waiters: RefCell<Vec<std::task::Waker>>,
}

/// Lines appended since the last write, with what goes to the ledger thread once they are written.
#[derive(Debug, Default)]
struct Batch {
    buf: Vec<u8>,
    /// The sequence number a file started for this batch is named after.
    first_seq: u64,
    /// Reservations opened by lines in `buf` (not carried into a rotated file: the batch writes them).
    opens: Vec<u64>,
    /// Settlements, handed to the ledger thread only after their lines are written: the ledger must never
    /// commit a settlement a crash could leave unjournaled (replay would charge its reservation again).
    records: Vec<Record>,
}

impl Journal {
    /// A journal for `source` in `dir` (created on the first append).
    pub fn new(dir: &Path, source: &str, tx: Sender<ToLedger>) -> Journal {
        Journal {
            source: std::sync::Arc::from(source),
            dir: dir.to_owned(),
            file: RefCell::new(None),
            written: Cell::new(0),
            rotate: ROTATE_BYTES,
            seq: Cell::new(0),
            rid: Cell::new(0),
            open: RefCell::new(HashMap::new()),
            failed: Cell::new(false),
            transition: RefCell::new(None),
            tx,
            batch: RefCell::new(Batch::default()),
            batched: Cell::new(false),
            appended: Cell::new(0),
            durable: Cell::new(0),
            flush_scheduled: Cell::new(false),
            waiters: RefCell::new(Vec::new()),
        }
    }

    /// Group commit: from now on an append only buffers its line, and the lines are written together by
    /// the flush a waiter arranges ([`Journal::schedule_flush`]), after the core's other ready tasks have
    /// appended theirs, or by [`Journal::flush`] on the core's tick. Set by the core that owns the journal; without it (tests,
    /// tools) every append is written at once.
    pub fn set_batched(&self, on: bool) {
        self.batched.set(on);
        if !on {
            let _ = self.flush();
        }
    }

    /// Whether a flush changed the journal's health since the last call: `Some(Err(why))` when appends
    /// started failing, `Some(Ok(()))` when they work again (taken: each change is reported once).
    pub fn take_transition(&self) -> Option<Result<(), String>> {
        self.transition.borrow_mut().take()
    }

    /// Resolves once every line appended before the call is written (to the page cache: see the module
    /// docs), or given up on after a failed write ([`Journal::failed`] says which). Someone must write the
    /// batch: [`Journal::schedule_flush`] says when the caller should arrange it.
    pub fn durable(&self) -> Durable<'_> {
        Durable {
            journal: self,
            ticket: self.appended.get(),
        }
    }

    /// Whether lines wait to be written and no flush is arranged yet; marks one as arranged. The core then
    /// spawns a task that calls [`Journal::flush`]: it runs after the tasks ready now (the runtime queues
    /// it behind them), so the lines they append join the same `write(2)` (group commit).
    pub fn schedule_flush(&self) -> bool {
        self.appended.get() > self.durable.get() && !self.flush_scheduled.replace(true)
    }

    /// Writes the lines appended so far in one `write(2)`, then hands their settlements to the ledger
    /// thread and wakes the tasks waiting on them. The core calls it on its tick for lines nobody awaits
    /// (releases, requests whose client left).
    pub fn flush(&self) -> std::io::Result<()> {
        self.flush_scheduled.set(false);
        let mut b = self.batch.borrow_mut();
        let result = if b.buf.is_empty() {
            Ok(())
        } else {
            let r = self.write_batch(&b.buf, b.first_seq, &b.opens);
            b.buf.clear();
            b.opens.clear();
            r
        };
        // A full channel drops only the hand-off: the ledger thread reads the entry back from this file
        // when the next one shows the gap (its `recovered_from_journal` count).
        for r in b.records.drain(..) {
            let _ = self.tx.try_send(ToLedger::Settled(r));
        }
        drop(b);
        if result.is_err() != self.failed.replace(result.is_err()) {
            *self.transition.borrow_mut() =
                Some(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
        self.durable.set(self.appended.get());
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
        result
    }

    /// Whether the last append failed (the journal cannot make spend durable right now).
    pub fn failed(&self) -> bool {
        self.failed.get()
    }

    /// Reservations journaled and not yet closed.
    pub fn open_reservations(&self) -> usize {
        self.open.borrow().len()
    }

    fn open(&self, first_seq: u64) -> std::io::Result<std::fs::File> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(format!("{}.{first_seq}.log", self.source));
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
    }

    /// Journals a reservation of `amount` on each of `keys`, made at `at` (at admission, before the request
    /// is forwarded): if the process dies before the request settles, the next start charges it at this
    /// amount. Returns the reservation's id, for [`Journal::record`] or [`Journal::release`] to close it;
    /// `None` when there is nothing to charge (no keys, $0) or the append failed.
    pub fn reserve(
        &self,
        keys: &[InstanceKey],
        amount: Money,
        at: Timestamp,
    ) -> std::io::Result<Option<u64>> {
        if amount.is_zero() || keys.is_empty() {
            return Ok(None);
        }
        let id = self.rid.get() + 1;
        self.rid.set(id);
        let result = self.write_line(
            &Line {
                q: None,
                r: Some(id),
                c: None,
                t: Some(at.as_millisecond()),
                a: Some(amount.pico().to_string()),
                k: keys
                    .iter()
                    .map(|k| {
                        (
                            std::borrow::Cow::Borrowed(&*k.budget.name),
                            std::borrow::Cow::Borrowed(k.member.as_deref().unwrap_or("")),
                        )
                    })
                    .collect(),
                u: None,
            },
            self.seq.get() + 1,
            Some(id),
        );
        result.and_then(|()| self.written_now()).map(|()| Some(id))
    }

    /// Closes reservation `id` without spend: the request never reached a provider.
    pub fn release(&self, id: u64) -> std::io::Result<()> {
        self.close(id)
    }

    fn close(&self, id: u64) -> std::io::Result<()> {
        let was_open = self.open.borrow_mut().remove(&id).is_some();
        if !was_open {
            return Ok(());
        }
        let line = Line {
            q: None,
            r: None,
            c: Some(id),
            t: None,
            a: None,
            k: Vec::new(),
            u: None,
        };
        self.write_line(&line, self.seq.get() + 1, None)
            .and_then(|()| self.written_now())
    }

    /// Journals `amount` spent at `at` on `keys`, closing reservation `closes` in the same line, with the
    /// request's `usage`, then hands it to the ledger thread. A line is written when there is spend (a
    /// nonzero amount on some instance) or usage; otherwise only the reservation is closed. Spend at $0 is
    /// journaled without instances.
    pub fn record(
        &self,
        keys: &[InstanceKey],
        amount: Money,
        at: Timestamp,
        closes: Option<u64>,
        usage: Option<Box<Metered>>,
    ) -> std::io::Result<()> {
        let spend = !amount.is_zero() && !keys.is_empty();
        if !spend && usage.is_none() {
            return closes.map_or(Ok(()), |id| self.close(id));
        }
        let (keys, amount) = if spend {
            (keys, amount)
        } else {
            (&[][..], Money::ZERO)
        };
        let closes = closes.filter(|id| self.open.borrow_mut().remove(id).is_some());
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        let instances: Vec<InstanceName> = keys.iter().map(instance_name).collect();
        let result = self.write_line(
            &Line {
                q: Some(seq),
                r: None,
                c: closes,
                t: Some(at.as_millisecond()),
                a: Some(amount.pico().to_string()),
                k: instances
                    .iter()
                    .map(|i| (i.budget.as_str().into(), i.member.as_str().into()))
                    .collect(),
                u: usage.as_deref().map(LineUsage::of),
            },
            seq,
            None,
        );
        let r = Record {
            source: std::sync::Arc::clone(&self.source),
            seq,
            at,
            amount,
            instances,
            usage,
        };
        self.batch.borrow_mut().records.push(r);
        result.and_then(|()| self.written_now())
    }

    /// Outside group commit, writes what was just appended (its outcome is the append's).
    fn written_now(&self) -> std::io::Result<()> {
        if self.batched.get() {
            Ok(())
        } else {
            self.flush()
        }
    }

    /// Appends `entry` to the batch as one line. `first_seq`: what a file started for this batch is named
    /// after (the first line's). `opens`: the line opens that reservation (remembered until it is closed).
    fn write_line(
        &self,
        entry: &Line<'_>,
        first_seq: u64,
        opens: Option<u64>,
    ) -> std::io::Result<()> {
        let mut b = self.batch.borrow_mut();
        if b.buf.is_empty() {
            b.first_seq = first_seq;
        }
        let start = b.buf.len();
        if let Err(e) = serde_json::to_writer(&mut b.buf, entry) {
            b.buf.truncate(start);
            return Err(std::io::Error::other(e));
        }
        b.buf.push(b'\n');
        if let Some(id) = opens {
            self.open.borrow_mut().insert(id, b.buf[start..].to_vec());
            b.opens.push(id);
        }
        self.appended.set(self.appended.get() + 1);
        Ok(())
    }

    /// Writes a batch of whole lines in one `write(2)` (`O_APPEND` keeps them whole and in order); a new
    /// file (the first, or past [`ROTATE_BYTES`]) is named after `first_seq` and starts with the lines of
    /// the reservations still open that earlier batches wrote (`batch_opens` are in `lines` already).
    fn write_batch(
        &self,
        lines: &[u8],
        first_seq: u64,
        batch_opens: &[u64],
    ) -> std::io::Result<()> {
        let mut file = self.file.borrow_mut();
        if file.is_none() || self.written.get() >= self.rotate {
            let mut f = self.open(first_seq)?;
            // The previous file may be deleted once its settlements are committed: the reservations it
            // opened that are still open move with the journal.
            let carried: Vec<u8> = self
                .open
                .borrow()
                .iter()
                .filter(|(id, _)| !batch_opens.contains(id))
                .flat_map(|(_, line)| line.iter().copied())
                .collect();
            if !carried.is_empty() {
                f.write_all(&carried)?;
            }
            *file = Some(f);
            self.written.set(carried.len() as u64);
        }
        let f = file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("journal not open"))?;
        f.write_all(lines)?;
        self.written.set(self.written.get() + lines.len() as u64);
        Ok(())
    }
}

/// The future [`Journal::durable`] returns.
#[derive(Debug)]
#[must_use = "a journal line is durable only once this resolves"]
pub struct Durable<'a> {
    journal: &'a Journal,
    ticket: u64,
}

impl std::future::Future for Durable<'_> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.journal.durable.get() >= self.ticket {
            return std::task::Poll::Ready(());
        }
        self.journal.waiters.borrow_mut().push(cx.waker().clone());
        std::task::Poll::Pending
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// The source and first sequence number a journal file name carries (`{source}.{first_seq}.log`).
pub fn parse_name(path: &Path) -> Option<(String, u64)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".log")?;
    let (source, first) = name.rsplit_once('.')?;
    Some((source.to_owned(), first.parse().ok()?))
}

/// The settlements of a journal file, in order (see [`read_entries`]).
pub fn read_file(path: &Path) -> std::io::Result<Vec<Record>> {
    Ok(read_entries(path)?
        .into_iter()
        .filter_map(|e| match e {
            Entry::Settled { record, .. } => Some(record),
            _ => None,
        })
        .collect())
}

/// Every entry of a journal file, in order: settlements, reservations and closes. A line that does not
/// parse (a torn last line) ends the read: nothing after a torn write can have been acknowledged.
pub fn read_entries(path: &Path) -> std::io::Result<Vec<Entry>> {
    let Some((source, _)) = parse_name(path) else {
        return Ok(Vec::new());
    };
    let source: std::sync::Arc<str> = std::sync::Arc::from(source.as_str());
    let f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).split(b'\n') {
        let line = line?;
        let Ok(l) = serde_json::from_slice::<Line<'_>>(&line) else {
            break;
        };
        if l.q.is_none() && l.r.is_none() {
            match l.c {
                Some(id) => {
                    out.push(Entry::Closed(id));
                    continue;
                }
                None => break,
            }
        }
        let at = l.t.and_then(|t| Timestamp::from_millisecond(t).ok());
        let pico = l.a.as_deref().and_then(|a| a.parse::<i128>().ok());
        let (Some(at), Some(pico)) = (at, pico) else {
            break;
        };
        let instances: Vec<InstanceName> =
            l.k.into_iter()
                .map(|(b, m)| InstanceName {
                    budget: b.into_owned(),
                    member: m.into_owned(),
                })
                .collect();
        out.push(match (l.q, l.r) {
            (Some(seq), _) => Entry::Settled {
                record: Record {
                    source: std::sync::Arc::clone(&source),
                    seq,
                    at,
                    amount: Money::from_pico(pico),
                    instances,
                    usage: l.u.and_then(LineUsage::into_metered).map(Box::new),
                },
                closes: l.c,
            },
            (None, Some(id)) => Entry::Reserved {
                id,
                at,
                amount: Money::from_pico(pico),
                instances,
            },
            (None, None) => break,
        });
    }
    Ok(out)
}

/// What a crashed run's journal files (one source, all its files) left unsettled: the reservations with no
/// closing entry, each as a charge at its reserved amount, and the sequence number those charges are
/// committed under: one past every settlement of the source (and past what its last file's name
/// promises), so a replay that already committed them (its `applied` at or past it) skips them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unsettled {
    /// `(at, amount, instances)` per reservation never closed, in id order.
    pub orphans: Vec<(Timestamp, Money, Vec<InstanceName>)>,
    /// The sequence number the orphans' charges are committed under.
    pub seq: u64,
}

/// Finds the reservations in `entries` (every entry of one source's files, in any order) that no entry
/// closes. `last_first`: the first sequence number in the name of the source's newest file.
pub fn unsettled(entries: &[Entry], last_first: u64) -> Unsettled {
    let mut opened: std::collections::BTreeMap<u64, (Timestamp, Money, &[InstanceName])> =
        Default::default();
    let mut closed = std::collections::HashSet::new();
    let mut max_seq = last_first.saturating_sub(1);
    for e in entries {
        match e {
            Entry::Settled { record, closes } => {
                max_seq = max_seq.max(record.seq);
                if let Some(id) = closes {
                    closed.insert(*id);
                }
            }
            Entry::Reserved {
                id,
                at,
                amount,
                instances,
            } => {
                opened.insert(*id, (*at, *amount, instances));
            }
            Entry::Closed(id) => {
                closed.insert(*id);
            }
        }
    }
    Unsettled {
        orphans: opened
            .into_iter()
            .filter(|(id, _)| !closed.contains(id))
            .map(|(_, (at, amount, instances))| (at, amount, instances.to_vec()))
            .collect(),
        seq: max_seq + 1,
    }
}

/// The journal files in `dir`, by source, each source's files in sequence order.
pub fn list(
    dir: &Path,
) -> std::io::Result<std::collections::BTreeMap<String, Vec<(u64, PathBuf)>>> {
    let mut out: std::collections::BTreeMap<String, Vec<(u64, PathBuf)>> = Default::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in entries {
        let path = e?.path();
        if let Some((source, first)) = parse_name(&path) {
            out.entry(source).or_default().push((first, path));
        }
    }
    for files in out.values_mut() {
        files.sort();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn budgets() -> Vec<InstanceKey> {
        let set = tollgate_core::budget::BudgetSet::from_raw(
            toml::from_str::<toml::Table>(
                "[[budgets]]\nname = \"team\"\namount_usd = \"1\"\nwindow = \"day\"\nscope = \"everyone\"\n[[budgets]]\nname = \"me\"\namount_usd = \"1\"\nwindow = \"day\"\nscope = \"each_identity\"\n",
            )
            .unwrap()["budgets"]
                .clone()
                .try_into()
                .unwrap(),
            Default::default(),
        )
        .unwrap();
        vec![
            InstanceKey {
                budget: std::sync::Arc::clone(set.get("team").unwrap()),
                member: None,
            },
            InstanceKey {
                budget: std::sync::Arc::clone(set.get("me").unwrap()),
                member: Some(std::sync::Arc::from("okta:a")),
            },
        ]
    }

    fn entries(dir: &Path, source: &str) -> (Vec<Entry>, u64) {
        let files = list(dir).unwrap().remove(source).unwrap_or_default();
        let last_first = files.last().map_or(0, |(f, _)| *f);
        let mut out = Vec::new();
        for (_, p) in files {
            out.extend(read_entries(&p).unwrap());
        }
        (out, last_first)
    }

    /// A reservation closed by its settlement, by a release, or by a settlement at $0 is settled; one with
    /// no closing line (the process died with the request in flight) is an orphan, charged at its
    /// reserved amount on every instance it held, under one sequence number past the settlements.
    #[test]
    fn reservations_without_a_closing_line_are_orphans() {
        let dir = std::env::temp_dir().join(format!("tg-journal-orphans-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (tx, _rx) = crossbeam_channel::bounded(16);
        let j = Journal::new(&dir, "run-c0", tx);
        let keys = budgets();
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let settled = j.reserve(&keys, Money::from_pico(100), t0).unwrap();
        let released = j.reserve(&keys, Money::from_pico(200), t0).unwrap();
        let free = j.reserve(&keys, Money::from_pico(300), t0).unwrap();
        let in_flight = j.reserve(&keys, Money::from_pico(400), t0).unwrap();
        assert_eq!(j.open_reservations(), 4);
        j.record(&keys, Money::from_pico(60), t0, settled, None)
            .unwrap();
        j.release(released.unwrap()).unwrap();
        j.record(&keys, Money::ZERO, t0, free, None).unwrap();
        assert_eq!(j.open_reservations(), 1);
        // Nothing to charge: no line, no id.
        assert_eq!(j.reserve(&keys, Money::ZERO, t0).unwrap(), None);
        assert_eq!(j.reserve(&[], Money::from_pico(5), t0).unwrap(), None);

        let (all, last_first) = entries(&dir, "run-c0");
        assert_eq!(all.len(), 7, "{all:?}");
        assert!(
            matches!(&all[4], Entry::Settled { record, closes } if record.seq == 1 && *closes == settled)
        );
        let open = unsettled(&all, last_first);
        assert_eq!(open.seq, 2);
        assert_eq!(open.orphans.len(), 1);
        let (at, amount, instances) = &open.orphans[0];
        assert_eq!((*at, *amount), (t0, Money::from_pico(400)));
        assert_eq!(
            instances,
            &keys.iter().map(instance_name).collect::<Vec<_>>()
        );
        // Closed now (the request finished): no orphan left.
        j.record(&keys, Money::from_pico(350), t0, in_flight, None)
            .unwrap();
        let (all, last_first) = entries(&dir, "run-c0");
        let open = unsettled(&all, last_first);
        assert!(open.orphans.is_empty());
        assert_eq!(open.seq, 3);
        // The settlements read as before.
        let files = list(&dir).unwrap();
        assert_eq!(read_file(&files["run-c0"][0].1).unwrap().len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A rotated journal carries its open reservations into the new file: the old one may be deleted once
    /// its settlements are committed, and the orphan is still found.
    #[test]
    fn open_reservations_move_with_a_rotation() {
        let dir = std::env::temp_dir().join(format!("tg-journal-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (tx, _rx) = crossbeam_channel::bounded(1024);
        let mut j = Journal::new(&dir, "run-c0", tx);
        j.rotate = 300;
        let keys = budgets();
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let long = j.reserve(&keys, Money::from_pico(999), t0).unwrap();
        for _ in 0..20 {
            let id = j.reserve(&keys, Money::from_pico(10), t0).unwrap();
            j.record(&keys, Money::from_pico(5), t0, id, None).unwrap();
        }
        let files = list(&dir).unwrap().remove("run-c0").unwrap();
        assert!(files.len() > 2, "{files:?}");
        // The ledger thread deletes every file but the newest once committed.
        for (_, p) in &files[..files.len() - 1] {
            std::fs::remove_file(p).unwrap();
        }
        let (all, last_first) = entries(&dir, "run-c0");
        let open = unsettled(&all, last_first);
        assert_eq!(open.orphans.len(), 1, "{all:?}");
        assert_eq!(open.orphans[0].1, Money::from_pico(999));
        assert_eq!(open.seq, 21);
        j.release(long.unwrap()).unwrap();
        let (all, last_first) = entries(&dir, "run-c0");
        assert!(unsettled(&all, last_first).orphans.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Group commit: appends only buffer; a waiter resolves only once the batch is written; the ledger
    /// thread gets a settlement only after its line is in the file; one flush writes every line of the
    /// batch, and a rotation inside a batch carries only the open reservations earlier batches wrote.
    #[test]
    fn batched_lines_are_written_together_before_waiters_resolve_and_the_ledger_hears() {
        use std::future::Future;
        let dir = std::env::temp_dir().join(format!("tg-journal-batch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (tx, rx) = crossbeam_channel::bounded(1024);
        let mut j = Journal::new(&dir, "run-c0", tx);
        j.rotate = 400;
        j.set_batched(true);
        let keys = budgets();
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());

        // Nothing pending: resolves at once, and there is no flush to arrange.
        assert!(!j.schedule_flush());
        assert!(std::pin::pin!(j.durable()).poll(&mut cx).is_ready());

        let held = j.reserve(&keys, Money::from_pico(999), t0).unwrap();
        let first = j.reserve(&keys, Money::from_pico(10), t0).unwrap();
        let mut wait_first = Box::pin(j.durable());
        assert!(j.schedule_flush(), "the first waiter arranges the flush");
        assert!(!j.schedule_flush(), "once per batch");
        j.record(&keys, Money::from_pico(5), t0, first, None)
            .unwrap();
        let mut wait_second = Box::pin(j.durable());
        assert!(wait_first.as_mut().poll(&mut cx).is_pending());
        assert!(wait_second.as_mut().poll(&mut cx).is_pending());
        assert!(
            list(&dir).unwrap().is_empty(),
            "nothing written before the flush"
        );
        assert!(
            rx.try_recv().is_err(),
            "the ledger hears only of written lines"
        );

        j.flush().unwrap();
        assert!(wait_first.as_mut().poll(&mut cx).is_ready());
        assert!(wait_second.as_mut().poll(&mut cx).is_ready());
        assert!(matches!(rx.try_recv(), Ok(ToLedger::Settled(r)) if r.seq == 1));
        let (all, _) = entries(&dir, "run-c0");
        assert_eq!(all.len(), 3, "{all:?}");

        // Past the rotation size, the next batch starts a file with the still-open reservation carried once.
        for _ in 0..6 {
            let id = j.reserve(&keys, Money::from_pico(10), t0).unwrap();
            j.record(&keys, Money::from_pico(5), t0, id, None).unwrap();
        }
        j.flush().unwrap();
        let opened = j.reserve(&keys, Money::from_pico(7), t0).unwrap();
        j.flush().unwrap();
        let files = list(&dir).unwrap().remove("run-c0").unwrap();
        assert_eq!(files.len(), 2, "{files:?}");
        let newest = read_entries(&files[1].1).unwrap();
        let reserved: Vec<u64> = newest
            .iter()
            .filter_map(|e| match e {
                Entry::Reserved { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(reserved, vec![held.unwrap(), opened.unwrap()], "{newest:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A request's usage rides on its settlement line and reads back whole; a request without budgets
    /// journals a line with no instances; a line from before usage was journaled reads with none.
    #[test]
    fn usage_is_journaled_with_or_without_budgets_and_old_lines_still_read() {
        let dir = std::env::temp_dir().join(format!("tg-journal-usage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (tx, rx) = crossbeam_channel::bounded(16);
        let j = Journal::new(&dir, "run-c0", tx);
        let keys = budgets();
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let metered = Metered {
            identity: Identity {
                kind: IdentityKind::Service,
                subject: "ci-bot".into(),
                email: None,
                groups: std::sync::Arc::from(vec![std::sync::Arc::<str>::from("plat,form")]),
                source: "service-token".into(),
                token_id: None,
                attributes: std::sync::Arc::from(Vec::new()),
            },
            provider: "openai".into(),
            model: "gpt-4o".into(),
            attributes: vec![("team".into(), "a;b".into())],
            usage: Usage {
                input_tokens: 10,
                cached_input_tokens: 2,
                cache_write_5m_tokens: 3,
                cache_write_1h_tokens: 4,
                output_tokens: 5,
                reasoning_tokens: 1,
                estimated: true,
            },
            cost: Cost {
                list: Money::from_pico(200),
                effective: Money::from_pico(150),
            },
        };
        let id = j.reserve(&keys, Money::from_pico(900), t0).unwrap();
        j.record(
            &keys,
            Money::from_pico(150),
            t0,
            id,
            Some(Box::new(metered.clone())),
        )
        .unwrap();
        j.record(&[], Money::ZERO, t0, None, Some(Box::new(metered.clone())))
            .unwrap();
        // Nothing to journal: no spend, no usage.
        j.record(&[], Money::ZERO, t0, None, None).unwrap();
        let files = list(&dir).unwrap();
        let recs = read_file(&files["run-c0"][0].1).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].instances.len(), 2);
        assert_eq!(recs[0].usage.as_deref(), Some(&metered));
        assert!(recs[1].instances.is_empty());
        assert_eq!(recs[1].seq, 2);
        assert_eq!(recs[1].usage.as_deref(), Some(&metered));
        let handed: Vec<Record> = rx
            .try_iter()
            .filter_map(|m| match m {
                ToLedger::Settled(r) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(handed, recs);
        let (all, last_first) = entries(&dir, "run-c0");
        assert!(unsettled(&all, last_first).orphans.is_empty());
        // A line an older Tollgate wrote: spend only.
        let old = dir.join("old-c0.1.log");
        std::fs::write(
            &old,
            "{\"q\":1,\"t\":1000,\"a\":\"5\",\"k\":[[\"team\",\"\"]]}\n",
        )
        .unwrap();
        let r = read_file(&old).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].usage, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_round_trip_and_torn_lines_end_the_read() {
        let dir = std::env::temp_dir().join(format!("tg-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("123-456-c0.1.log");
        assert_eq!(parse_name(&path), Some(("123-456-c0".into(), 1)));
        std::fs::write(
            &path,
            "{\"q\":1,\"t\":1000,\"a\":\"5\",\"k\":[[\"team\",\"\"],[\"me\",\"okta:a\"]]}\n{\"q\":2,\"t\":1001,\"a\":\"7\",\"k\":[[\"team\",\"\"]]}\n{\"q\":3,\"t\":10",
        )
        .unwrap();
        let r = read_file(&path).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].instances.len(), 2);
        assert_eq!(r[1].amount, Money::from_pico(7));
        assert_eq!(&*r[1].source, "123-456-c0");
        let listed = list(&dir).unwrap();
        assert_eq!(listed["123-456-c0"].len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A journal that cannot be written says so (budgets with on_store_failure = "closed" then refuse on
    /// this core), still hands the settlement to the ledger thread, and recovers when writes work again.
    #[test]
    fn an_unwritable_journal_reports_failure_and_still_hands_off() {
        let base = std::env::temp_dir().join(format!("tg-journal-ro-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        // The journal directory's path is a file: nothing can be created under it.
        let blocked = base.join("journal");
        std::fs::write(&blocked, b"not a directory").unwrap();
        let (tx, rx) = crossbeam_channel::bounded(16);
        let j = Journal::new(&blocked, "run-c0", tx);
        let set = tollgate_core::budget::BudgetSet::from_raw(
            toml::from_str::<toml::Table>(
                "[[budgets]]\nname = \"team\"\namount_usd = \"1\"\nwindow = \"day\"\nscope = \"everyone\"\n",
            )
            .unwrap()["budgets"]
                .clone()
                .try_into()
                .unwrap(),
            Default::default(),
        )
        .unwrap();
        let key = InstanceKey {
            budget: std::sync::Arc::clone(set.get("team").unwrap()),
            member: None,
        };
        let now = Timestamp::now();
        assert!(j
            .record(
                std::slice::from_ref(&key),
                Money::from_pico(5),
                now,
                None,
                None
            )
            .is_err());
        assert!(j.failed());
        assert!(
            matches!(rx.try_recv(), Ok(ToLedger::Settled(r)) if r.amount == Money::from_pico(5))
        );
        // The change is reported once (the core logs `journal_failed` from it).
        assert!(matches!(j.take_transition(), Some(Err(e)) if !e.is_empty()));
        assert_eq!(j.take_transition(), None);

        // Group commit: the failed batch's waiter still resolves, the settlement is still handed off, and
        // the journal stays failed without a second report.
        j.set_batched(true);
        j.record(
            std::slice::from_ref(&key),
            Money::from_pico(6),
            now,
            None,
            None,
        )
        .unwrap();
        let mut wait = Box::pin(j.durable());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(std::future::Future::poll(wait.as_mut(), &mut cx).is_pending());
        assert!(j.flush().is_err());
        assert!(std::future::Future::poll(wait.as_mut(), &mut cx).is_ready());
        assert!(j.failed());
        assert_eq!(j.take_transition(), None);
        assert!(
            matches!(rx.try_recv(), Ok(ToLedger::Settled(r)) if r.amount == Money::from_pico(6))
        );
        j.set_batched(false);

        // The path becomes a directory: appends work again.
        std::fs::remove_file(&blocked).unwrap();
        std::fs::create_dir_all(&blocked).unwrap();
        j.record(
            std::slice::from_ref(&key),
            Money::from_pico(7),
            now,
            None,
            None,
        )
        .unwrap();
        assert!(!j.failed());
        assert_eq!(j.take_transition(), Some(Ok(())));
        let files = list(&blocked).unwrap();
        let recs = read_file(&files["run-c0"][0].1).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].seq, 3);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
