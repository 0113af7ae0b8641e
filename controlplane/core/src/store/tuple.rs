//! FoundationDB's tuple layer, for the element types Tollgate's keys use: byte strings, unicode strings
//! and 64-bit integers. Keys are packed so that their byte order is the order of the tuples, which is
//! what makes range reads over a prefix (one owner's spend, one day's usage) work on any ordered store.
//!
//! Owns: [`Element`], [`pack`], [`unpack`] and [`range`]. The encoding is byte-compatible with
//! FoundationDB's tuple spec (codes 0x01 bytes, 0x02 string, 0x0c..=0x1c integers), so keys written here
//! read the same through FoundationDB's own bindings and a later FoundationDB store needs no migration.
//!
//! Fails: [`unpack`] returns [`StoreError::Corrupt`] on anything it did not (or could not) write: an
//! unknown type code, a missing terminator, invalid UTF-8, a non-minimal or out-of-range integer. It
//! never panics, whatever the input. [`pack`] cannot fail.
//!
//! Cost: linear in the key's length, one allocation for the packed key; keys are tens of bytes.

use super::StoreError;

const BYTES: u8 = 0x01;
const STRING: u8 = 0x02;
/// The code of the integer zero; `ZERO + n` starts a positive integer of `n` bytes, `ZERO - n` a negative.
const INT_ZERO: u8 = 0x14;
const ESCAPE: u8 = 0xff;

/// One element of a tuple key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Element {
    Bytes(Vec<u8>),
    Str(String),
    Int(i64),
}

impl From<&str> for Element {
    fn from(s: &str) -> Self {
        Element::Str(s.to_owned())
    }
}

impl From<String> for Element {
    fn from(s: String) -> Self {
        Element::Str(s)
    }
}

impl From<i64> for Element {
    fn from(n: i64) -> Self {
        Element::Int(n)
    }
}

impl From<&[u8]> for Element {
    fn from(b: &[u8]) -> Self {
        Element::Bytes(b.to_vec())
    }
}

/// Packs `elements` into a key whose byte order is the tuples' order.
pub fn pack(elements: &[Element]) -> Vec<u8> {
    let mut out = Vec::with_capacity(elements.len() * 10);
    for e in elements {
        match e {
            Element::Bytes(b) => pack_escaped(&mut out, BYTES, b),
            Element::Str(s) => pack_escaped(&mut out, STRING, s.as_bytes()),
            Element::Int(n) => pack_int(&mut out, *n),
        }
    }
    out
}

/// A byte or unicode string: the code, the bytes with every 0x00 written as 0x00 0xFF (so the 0x00 that
/// terminates it sorts before any continuation), then 0x00.
fn pack_escaped(out: &mut Vec<u8>, code: u8, bytes: &[u8]) {
    out.push(code);
    for &b in bytes {
        out.push(b);
        if b == 0 {
            out.push(ESCAPE);
        }
    }
    out.push(0);
}

/// An integer: its length in the code (longer magnitudes sort further from zero), then its magnitude
/// big-endian in as few bytes as hold it; negative magnitudes in one's complement so that larger
/// magnitudes sort first.
fn pack_int(out: &mut Vec<u8>, n: i64) {
    if n == 0 {
        out.push(INT_ZERO);
        return;
    }
    let magnitude = n.unsigned_abs();
    let len = byte_len(magnitude);
    let bytes = if n > 0 {
        magnitude.to_be_bytes()
    } else {
        (!magnitude).to_be_bytes()
    };
    // `len` is 1..=8, so the codes stay within 0x0c..=0x1c and the slice within the 8 bytes.
    if n > 0 {
        out.push(INT_ZERO + len as u8);
    } else {
        out.push(INT_ZERO - len as u8);
    }
    out.extend_from_slice(bytes.get(8 - len..).unwrap_or(&[]));
}

/// How many bytes hold `magnitude` (1..=8 for a non-zero one).
fn byte_len(magnitude: u64) -> usize {
    8 - (magnitude.leading_zeros() / 8) as usize
}

/// Unpacks a key written by [`pack`].
pub fn unpack(key: &[u8]) -> Result<Vec<Element>, StoreError> {
    let mut elements = Vec::new();
    let mut pos = 0;
    while let Some(&code) = key.get(pos) {
        pos += 1;
        match code {
            BYTES => {
                let (bytes, next) = unpack_escaped(key, pos)?;
                elements.push(Element::Bytes(bytes));
                pos = next;
            }
            STRING => {
                let (bytes, next) = unpack_escaped(key, pos)?;
                let s = String::from_utf8(bytes).map_err(|_| {
                    StoreError::Corrupt(format!("a tuple string at byte {pos} is not UTF-8"))
                })?;
                elements.push(Element::Str(s));
                pos = next;
            }
            0x0c..=0x1c => {
                let (n, next) = unpack_int(key, pos, code)?;
                elements.push(Element::Int(n));
                pos = next;
            }
            other => {
                return Err(StoreError::Corrupt(format!(
                    "tuple type code {other:#04x} at byte {} is not one Tollgate writes",
                    pos - 1
                )))
            }
        }
    }
    Ok(elements)
}

/// Reads an escaped string starting at `pos` (after its code); returns it and the position after its
/// terminator.
fn unpack_escaped(key: &[u8], mut pos: usize) -> Result<(Vec<u8>, usize), StoreError> {
    let mut out = Vec::new();
    loop {
        match key.get(pos) {
            None => {
                return Err(StoreError::Corrupt(
                    "a tuple string has no terminator".to_owned(),
                ))
            }
            Some(0) if key.get(pos + 1) == Some(&ESCAPE) => {
                out.push(0);
                pos += 2;
            }
            Some(0) => return Ok((out, pos + 1)),
            Some(&b) => {
                out.push(b);
                pos += 1;
            }
        }
    }
}

/// Reads an integer whose code is `code` and whose bytes start at `pos`; returns it and the position
/// after it. Only the minimal encoding [`pack`] writes is accepted, so every key has one reading.
fn unpack_int(key: &[u8], pos: usize, code: u8) -> Result<(i64, usize), StoreError> {
    if code == INT_ZERO {
        return Ok((0, pos));
    }
    let negative = code < INT_ZERO;
    let len = usize::from(code.abs_diff(INT_ZERO));
    let bytes = key.get(pos..pos + len).ok_or_else(|| {
        StoreError::Corrupt(format!("a tuple integer at byte {pos} is cut short"))
    })?;
    let mut buf = [0u8; 8];
    buf[8 - len..].copy_from_slice(bytes);
    let raw = u64::from_be_bytes(buf);
    let magnitude = if negative {
        // One's complement within `len` bytes.
        let mask = if len == 8 {
            u64::MAX
        } else {
            (1u64 << (len * 8)) - 1
        };
        !raw & mask
    } else {
        raw
    };
    if magnitude == 0 || byte_len(magnitude) != len {
        return Err(StoreError::Corrupt(format!(
            "a tuple integer at byte {pos} is not minimally encoded"
        )));
    }
    let n = if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    };
    let n = n.ok_or_else(|| {
        StoreError::Corrupt(format!(
            "a tuple integer at byte {pos} does not fit 64 bits"
        ))
    })?;
    Ok((n, pos + len))
}

/// The keys strictly inside `prefix`'s subspace, as FoundationDB's `Subspace.range()` gives them:
/// `[pack(prefix) + 0x00, pack(prefix) + 0xFF)`, which holds every key that packs `prefix` followed by
/// more elements, and not the key `pack(prefix)` itself.
pub fn range(prefix: &[Element]) -> (Vec<u8>, Vec<u8>) {
    let packed = pack(prefix);
    let mut begin = packed.clone();
    begin.push(0x00);
    let mut end = packed;
    end.push(0xff);
    (begin, end)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use Element::{Bytes, Int, Str};

    #[test]
    fn tuple_known_encodings_match_the_foundationdb_spec() {
        assert_eq!(pack(&[Str("hello".into())]), b"\x02hello\x00");
        assert_eq!(
            pack(&[Bytes(b"foo\x00bar".to_vec())]),
            b"\x01foo\x00\xffbar\x00"
        );
        assert_eq!(pack(&[Str("\u{00e9}".into())]), b"\x02\xc3\xa9\x00");
        assert_eq!(pack(&[Int(0)]), b"\x14");
        assert_eq!(pack(&[Int(1)]), b"\x15\x01");
        assert_eq!(pack(&[Int(-1)]), b"\x13\xfe");
        assert_eq!(pack(&[Int(255)]), b"\x15\xff");
        assert_eq!(pack(&[Int(256)]), b"\x16\x01\x00");
        assert_eq!(pack(&[Int(-255)]), b"\x13\x00");
        assert_eq!(pack(&[Int(-256)]), b"\x12\xfe\xff");
        assert_eq!(pack(&[Int(-5551212)]), b"\x11\xab\x4b\x93");
        assert_eq!(
            pack(&[Int(i64::MAX)]),
            b"\x1c\x7f\xff\xff\xff\xff\xff\xff\xff"
        );
        assert_eq!(
            pack(&[Int(i64::MIN)]),
            b"\x0c\x7f\xff\xff\xff\xff\xff\xff\xff"
        );
        assert_eq!(
            pack(&[Str("a".into()), Int(1), Bytes(vec![])]),
            b"\x02a\x00\x15\x01\x01\x00"
        );
        assert_eq!(pack(&[]), b"");
    }

    fn ints() -> Vec<i64> {
        let mut v = vec![i64::MIN, i64::MIN + 1, i64::MAX, i64::MAX - 1, 0];
        for shift in 0..63 {
            let p = 1i64 << shift;
            v.extend([p, p - 1, p + 1, -p, -p + 1, -p - 1]);
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    #[test]
    fn tuple_round_trips() {
        for n in ints() {
            assert_eq!(unpack(&pack(&[Int(n)])).unwrap(), vec![Int(n)], "{n}");
        }
        let t = vec![
            Str("spend".into()),
            Bytes(b"\x00\xff\x00".to_vec()),
            Int(-42),
            Str("caf\u{00e9}\u{0000}x".into()),
            Int(1 << 40),
            Bytes(vec![]),
            Str(String::new()),
        ];
        assert_eq!(unpack(&pack(&t)).unwrap(), t);
        assert_eq!(unpack(b"").unwrap(), vec![]);
    }

    #[test]
    fn tuple_order_is_byte_order() {
        let ints = ints();
        for pair in ints.windows(2) {
            let (a, b) = (pack(&[Int(pair[0])]), pack(&[Int(pair[1])]));
            assert!(a < b, "{} < {} but {a:02x?} >= {b:02x?}", pair[0], pair[1]);
        }
        // Strings, including prefixes and embedded zeros; a shorter tuple sorts before its extensions.
        let mut strs: Vec<Vec<Element>> = [
            "",
            "\u{0}",
            "\u{0}\u{0}",
            "\u{0}a",
            "a",
            "a\u{0}",
            "a\u{0}b",
            "aa",
            "ab",
            "b",
            "\u{7f}",
            "\u{e9}",
        ]
        .iter()
        .map(|s| vec![Str((*s).into())])
        .collect();
        strs.push(vec![Str("a".into()), Int(-1)]);
        strs.push(vec![Str("a".into()), Int(0)]);
        strs.push(vec![Str("a".into()), Str("".into())]);
        let mut by_tuple = strs.clone();
        by_tuple.sort_by(|x, y| cmp_tuple(x, y));
        let mut by_bytes = strs;
        by_bytes.sort_by_key(|t| pack(t));
        assert_eq!(by_tuple, by_bytes);
    }

    /// The tuple order FoundationDB defines, for the test's elements: by type code, then by value.
    fn cmp_tuple(a: &[Element], b: &[Element]) -> std::cmp::Ordering {
        fn rank(e: &Element) -> u8 {
            match e {
                Bytes(_) => 1,
                Str(_) => 2,
                Int(_) => 3,
            }
        }
        for (x, y) in a.iter().zip(b) {
            let o = match (x, y) {
                (Bytes(p), Bytes(q)) => p.cmp(q),
                (Str(p), Str(q)) => p.as_bytes().cmp(q.as_bytes()),
                (Int(p), Int(q)) => p.cmp(q),
                _ => rank(x).cmp(&rank(y)),
            };
            if o.is_ne() {
                return o;
            }
        }
        a.len().cmp(&b.len())
    }

    #[test]
    fn tuple_range_holds_the_prefix_extensions_only() {
        let prefix = [Str("spend".into()), Int(7)];
        let (begin, end) = range(&prefix);
        assert_eq!(begin, b"\x02spend\x00\x15\x07\x00");
        assert_eq!(end, b"\x02spend\x00\x15\x07\xff");
        let inside = pack(&[Str("spend".into()), Int(7), Str("x".into())]);
        let also_inside = pack(&[Str("spend".into()), Int(7), Bytes(vec![])]);
        let outside = pack(&[Str("spend".into()), Int(8)]);
        assert!(begin <= inside && inside < end);
        assert!(begin <= also_inside && also_inside < end);
        assert!(!(begin <= outside && outside < end));
        assert!(pack(&prefix) < begin);
    }

    #[test]
    fn tuple_rejects_bad_input() {
        for bad in [
            &b"\x02abc"[..],                         // no terminator
            b"\x01\x00\xff",                         // escaped zero, then no terminator
            b"\x02\xff\xfe\x00",                     // not UTF-8
            b"\x15",                                 // integer cut short
            b"\x16\x00\x01",                         // non-minimal positive
            b"\x13\xff",                             // negative zero
            b"\x12\xff\x00",                         // non-minimal negative
            b"\x1c\x80\0\0\0\0\0\0\0",               // above i64::MAX
            b"\x0c\x7f\xff\xff\xff\xff\xff\xff\xfe", // below i64::MIN
            b"\x05\x00",                             // nested tuple: not written here
            b"\x00",                                 // null: not written here
            b"\x21",
        ] {
            assert!(
                matches!(unpack(bad), Err(StoreError::Corrupt(_))),
                "{bad:02x?} -> {:?}",
                unpack(bad)
            );
        }
    }

    #[test]
    fn tuple_unpack_of_random_garbage_never_panics() {
        // A small xorshift generator: deterministic, no dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = [
            0x00, 0x01, 0x02, 0x0c, 0x13, 0x14, 0x15, 0x1c, 0x7f, 0x80, 0xff,
        ];
        for i in 0..20_000 {
            let len = (next() % 24) as usize;
            let key: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    // Half the time from the interesting bytes, to reach deep into the decoder.
                    if i % 2 == 0 {
                        alphabet[(r % alphabet.len() as u64) as usize]
                    } else {
                        r as u8
                    }
                })
                .collect();
            if let Ok(elements) = unpack(&key) {
                // What decodes re-encodes to the same bytes: one reading per key.
                assert_eq!(pack(&elements), key, "{key:02x?}");
            }
        }
    }
}
