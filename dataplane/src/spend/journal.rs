//! The spend journal: each core appends every settlement to its own file before the response's last byte
//! goes to the client, and hands the same settlement to the ledger thread ([`crate::spend::committer`]) over a
//! crossbeam channel. The ledger thread commits settlements to the store in batches; the journal is what
//! makes a settlement survive the process: after `kill -9`, the next start replays every journal entry the
//! store has not applied yet.
//!
//! Owns: [`Journal`] (one per core: its file, its sequence numbers, its sender), the file format of a
//! [`Record`] (the record itself is [`crate::spend::records`]'s: one JSON line
//! `{"q":seq,"t":unix_ms,"a":"pico_usd","k":[[budget, member], ...]}`), and [`read_file`] (for replay and for the ledger thread's catch-up when the channel was full).
//!
//! Guarantee: an append is one `write(2)` to a file opened with `O_APPEND`: once it returns, the entry is in
//! the kernel's page cache, which a process crash (`kill -9`, a panic, OOM) cannot lose; a machine crash
//! or power loss can lose what the ledger thread has not yet `fsync`ed (at most one second: it syncs the
//! journals once a second).
//! Sources: each core of each process run writes its own source (`{run}-c{core}`), in files rotated every
//! [`ROTATE_BYTES`] (`{source}.{first_seq}.log`), so sequence numbers identify entries without locks.
//!
//! Fails: an append that cannot be written (disk full, I/O error) is reported and marks the journal
//! failed: budgets with `on_store_failure = "closed"` then refuse new spend on this core (the settlement
//! itself still goes to the ledger thread and the in-memory ledger). A full channel drops only the hand-off:
//! the ledger thread sees the gap in sequence numbers and reads the missing entries from the file. A torn
//! last line (a crash mid-append, before the client could have seen its response end) is ignored on replay.
//! Cost: one small JSON format and one `write(2)` per settled request (bench `admission`: `journal_append`).

use std::cell::{Cell, RefCell};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use crossbeam_channel::Sender;
use jiff::Timestamp;
use tollgate_core::budget::InstanceKey;
use tollgate_core::store::ledger::InstanceName;
use tollgate_core::Money;

use crate::spend::records::{instance_name, Record, ToLedger};

/// A journal file is rotated past this size.
pub const ROTATE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(serde::Serialize, serde::Deserialize)]
struct Line<'a> {
    q: u64,
    t: i64,
    a: String,
    #[serde(borrow)]
    k: Vec<(std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>,
}

/// One core's journal.
#[derive(Debug)]
pub struct Journal {
    source: std::sync::Arc<str>,
    dir: PathBuf,
    file: RefCell<Option<std::fs::File>>,
    written: Cell<u64>,
    seq: Cell<u64>,
    failed: Cell<bool>,
    tx: Sender<ToLedger>,
    line: RefCell<Vec<u8>>,
}

impl Journal {
    /// A journal for `source` in `dir` (created on the first append).
    pub fn new(dir: &Path, source: &str, tx: Sender<ToLedger>) -> Journal {
        Journal {
            source: std::sync::Arc::from(source),
            dir: dir.to_owned(),
            file: RefCell::new(None),
            written: Cell::new(0),
            seq: Cell::new(0),
            failed: Cell::new(false),
            tx,
            line: RefCell::new(Vec::with_capacity(256)),
        }
    }

    /// Whether the last append failed (the journal cannot make spend durable right now).
    pub fn failed(&self) -> bool {
        self.failed.get()
    }

    fn open(&self, first_seq: u64) -> std::io::Result<std::fs::File> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(format!("{}.{first_seq}.log", self.source));
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
    }

    /// Journals `amount` spent at `at` on `keys`, then hands it to the ledger thread. Zero amounts are not
    /// recorded.
    pub fn record(
        &self,
        keys: &[InstanceKey],
        amount: Money,
        at: Timestamp,
    ) -> std::io::Result<()> {
        if amount.is_zero() || keys.is_empty() {
            return Ok(());
        }
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        let instances: Vec<InstanceName> = keys.iter().map(instance_name).collect();
        let result = self.append(seq, at, amount, &instances);
        self.failed.set(result.is_err());
        let r = Record {
            source: std::sync::Arc::clone(&self.source),
            seq,
            at,
            amount,
            instances,
        };
        // A full channel drops only the hand-off: the ledger thread reads the entry back from this file
        // when the next one shows the gap (its `recovered_from_journal` count).
        let _ = self.tx.try_send(ToLedger::Settled(r));
        result
    }

    fn append(
        &self,
        seq: u64,
        at: Timestamp,
        amount: Money,
        instances: &[InstanceName],
    ) -> std::io::Result<()> {
        let mut line = self.line.borrow_mut();
        line.clear();
        serde_json::to_writer(
            &mut *line,
            &Line {
                q: seq,
                t: at.as_millisecond(),
                a: amount.pico().to_string(),
                k: instances
                    .iter()
                    .map(|i| (i.budget.as_str().into(), i.member.as_str().into()))
                    .collect(),
            },
        )
        .map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file = self.file.borrow_mut();
        if file.is_none() || self.written.get() >= ROTATE_BYTES {
            *file = Some(self.open(seq)?);
            self.written.set(0);
        }
        let f = file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("journal not open"))?;
        // One write(2) of a whole line: O_APPEND keeps lines whole.
        f.write_all(&line)?;
        self.written.set(self.written.get() + line.len() as u64);
        Ok(())
    }
}

/// The source and first sequence number a journal file name carries (`{source}.{first_seq}.log`).
pub fn parse_name(path: &Path) -> Option<(String, u64)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".log")?;
    let (source, first) = name.rsplit_once('.')?;
    Some((source.to_owned(), first.parse().ok()?))
}

/// The entries of a journal file, in order. A line that does not parse (a torn last line) ends the read:
/// nothing after a torn write can have been acknowledged.
pub fn read_file(path: &Path) -> std::io::Result<Vec<Record>> {
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
        let (Ok(at), Ok(pico)) = (Timestamp::from_millisecond(l.t), l.a.parse::<i128>()) else {
            break;
        };
        out.push(Record {
            source: std::sync::Arc::clone(&source),
            seq: l.q,
            at,
            amount: Money::from_pico(pico),
            instances: l
                .k
                .into_iter()
                .map(|(b, m)| InstanceName {
                    budget: b.into_owned(),
                    member: m.into_owned(),
                })
                .collect(),
        });
    }
    Ok(out)
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
            .record(std::slice::from_ref(&key), Money::from_pico(5), now)
            .is_err());
        assert!(j.failed());
        assert!(
            matches!(rx.try_recv(), Ok(ToLedger::Settled(r)) if r.amount == Money::from_pico(5))
        );
        // The path becomes a directory: appends work again.
        std::fs::remove_file(&blocked).unwrap();
        std::fs::create_dir_all(&blocked).unwrap();
        j.record(std::slice::from_ref(&key), Money::from_pico(7), now)
            .unwrap();
        assert!(!j.failed());
        let files = list(&blocked).unwrap();
        let recs = read_file(&files["run-c0"][0].1).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].seq, 2);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
