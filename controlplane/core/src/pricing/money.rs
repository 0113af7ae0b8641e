//! Money and per-token prices as exact integers: no floats anywhere.
//!
//! Owns: [`Money`] (an amount in pico-USD, 1e-12 USD), [`TokenPrice`] (pico-USD per token, parsed from the
//! "USD per 1M tokens" decimal strings that providers publish), [`Percent`] (a discount), and the exact decimal
//! parser behind both.
//!
//! Why pico-USD: list prices are published in USD per million tokens with at most a few decimals
//! (`$0.075`, `$2.50`, `$0.005`). One USD per 1M tokens is 1e12 pico-USD / 1e6 tokens = 1e6 pico-USD per
//! token, so any price with up to 6 decimals is an exact whole number of pico-USD per token, and
//! tokens × price is exact integer multiplication. Nothing is rounded until a percentage discount is applied
//! (see `pricing`, where the one rounding rule lives).
//!
//! Fails: parsing returns a [`DecimalError`] naming what is wrong (sign, garbage, too many decimals, too
//! large); arithmetic on [`Money`] is checked and returns `None` on overflow rather than wrapping.
//! Cost: parsing runs at load time; the arithmetic is a few integer operations and never allocates
//! (only [`Money::usd`] builds a string).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Pico-USD in one USD.
pub const PICO_PER_USD: i128 = 1_000_000_000_000;

/// The most a [`TokenPrice`] may be: USD 1,000,000 per 1M tokens (1 USD per token).
///
/// The cap keeps every cost computation in range: `u64::MAX` tokens × this price × the five token classes
/// of a request is below 1e32, far inside `i128`, so computing a request's cost cannot overflow.
pub const MAX_PICO_PER_TOKEN: u64 = 1_000_000_000_000;

/// An amount of money in pico-USD (1e-12 USD). Serialises as the integer pico-USD count; use
/// [`Money::usd`] or `Display` for a human-readable USD string.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Money(i128);

impl Money {
    pub const ZERO: Money = Money(0);

    /// An amount of `pico` pico-USD.
    pub const fn from_pico(pico: i128) -> Money {
        Money(pico)
    }

    /// The amount in pico-USD.
    pub const fn pico(self) -> i128 {
        self.0
    }

    /// Parses a USD amount such as `"12.50"` or `"0.000125"` (at most 12 decimals, non-negative).
    pub fn parse_usd(s: &str) -> Result<Money, DecimalError> {
        parse_decimal(s, 12).map(Money)
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    pub fn checked_sub(self, other: Money) -> Option<Money> {
        self.0.checked_sub(other.0).map(Money)
    }

    /// `self × n`, `None` on overflow.
    pub fn checked_mul(self, n: i128) -> Option<Money> {
        self.0.checked_mul(n).map(Money)
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// The amount as a plain USD decimal without the `$` sign and with trailing zeros trimmed:
    /// `"0.000125"`, `"12.5"`, `"3"`, `"-0.01"`.
    pub fn usd(self) -> String {
        let mut s = String::with_capacity(24);
        // Writing to a String cannot fail.
        let _ = write_usd(&mut s, self.0);
        s
    }
}

fn write_usd(f: &mut impl fmt::Write, pico: i128) -> fmt::Result {
    let abs = pico.unsigned_abs();
    let per = PICO_PER_USD.unsigned_abs();
    // One 128-bit division (a library call, ~10x a 64-bit one); the fraction is below 10^12 and the whole
    // part fits 64 bits below $18 quintillion, so the digits are written with 64-bit arithmetic (this runs
    // several times per request: headers, the access log).
    let (whole, frac) = (abs / per, (abs % per) as u64);
    if pico < 0 {
        f.write_char('-')?;
    }
    match u64::try_from(whole) {
        Ok(w) => write!(f, "{w}")?,
        Err(_) => write!(f, "{whole}")?,
    }
    write_fraction(f, frac, 12)
}

/// Writes `.digits` for a fraction of `frac / 10^width` with trailing zeros trimmed; nothing when zero.
/// Does not allocate.
fn write_fraction(f: &mut impl fmt::Write, mut frac: u64, mut width: usize) -> fmt::Result {
    if frac == 0 {
        return Ok(());
    }
    // Trim trailing zeros (`frac` is non-zero, so this ends).
    while width > 0 && frac.is_multiple_of(10) {
        frac /= 10;
        width -= 1;
    }
    // At most 12 digits, written from the right into a fixed buffer (no formatter padding machinery).
    let mut digits = [b'0'; 12];
    let width = width.min(digits.len());
    let mut i = width;
    while i > 0 && frac > 0 {
        i -= 1;
        digits[i] = b'0' + (frac % 10) as u8;
        frac /= 10;
    }
    f.write_char('.')?;
    // ASCII digits only.
    f.write_str(std::str::from_utf8(&digits[..width]).map_err(|_| fmt::Error)?)
}

impl fmt::Display for Money {
    /// `$0.000125`, `$12.5`, `-$0.01`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 0 {
            f.write_str("-$")?;
            write_usd(f, -self.0)
        } else {
            f.write_str("$")?;
            write_usd(f, self.0)
        }
    }
}

/// A price per token in pico-USD, at most [`MAX_PICO_PER_TOKEN`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct TokenPrice(u64);

impl TokenPrice {
    pub const ZERO: TokenPrice = TokenPrice(0);

    /// A price of `pico` pico-USD per token, `None` above [`MAX_PICO_PER_TOKEN`].
    pub const fn from_pico_per_token(pico: u64) -> Option<TokenPrice> {
        if pico <= MAX_PICO_PER_TOKEN {
            Some(TokenPrice(pico))
        } else {
            None
        }
    }

    /// Parses a published "USD per 1M tokens" decimal (`"2.50"`, `"0.0375"`, `"15"`) exactly: at most 6
    /// decimals (more would be a fraction of a pico-USD per token), no sign, at most USD 1,000,000.
    pub fn parse_per_million(s: &str) -> Result<TokenPrice, DecimalError> {
        // USD per 1M tokens × 1e6 = pico-USD per token: the 6-decimal fixed-point value is the answer.
        let v = parse_decimal(s, 6)?;
        match u64::try_from(v) {
            Ok(p) if p <= MAX_PICO_PER_TOKEN => Ok(TokenPrice(p)),
            _ => Err(DecimalError::TooLarge {
                input: s.to_owned(),
                max: "1000000",
            }),
        }
    }

    pub const fn pico_per_token(self) -> u64 {
        self.0
    }

    /// The cost of `tokens` tokens. Exact; cannot overflow (see [`MAX_PICO_PER_TOKEN`]).
    pub const fn times(self, tokens: u64) -> Money {
        Money(self.0 as i128 * tokens as i128)
    }
}

impl fmt::Display for TokenPrice {
    /// In the published unit: `$2.5/1M`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // pico-USD per token × 1e6 tokens = pico-USD per 1M tokens.
        write!(f, "{}/1M", Money(self.0 as i128 * 1_000_000))
    }
}

/// A percentage between 0 and 100 inclusive with up to 4 decimals, stored in parts per million of the
/// whole (`"12.5"` is 125 000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Percent(u32);

impl Percent {
    /// Parts per million in 100 %.
    pub const WHOLE_PPM: u32 = 1_000_000;

    /// Parses `"12.5"` (meaning 12.5 %): no sign, no `%`, at most 4 decimals, at most 100.
    pub fn parse(s: &str) -> Result<Percent, DecimalError> {
        let v = parse_decimal(s, 4)?;
        match u32::try_from(v) {
            Ok(ppm) if ppm <= Self::WHOLE_PPM => Ok(Percent(ppm)),
            _ => Err(DecimalError::TooLarge {
                input: s.to_owned(),
                max: "100",
            }),
        }
    }

    pub const fn from_ppm(ppm: u32) -> Option<Percent> {
        if ppm <= Self::WHOLE_PPM {
            Some(Percent(ppm))
        } else {
            None
        }
    }

    pub const fn ppm(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 10_000, self.0 % 10_000);
        write!(f, "{whole}")?;
        write_fraction(f, u64::from(frac), 4)?;
        f.write_str("%")
    }
}

/// Why a decimal string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    #[error("is empty; write a decimal number such as \"2.50\"")]
    Empty,
    #[error("{input:?} is negative; prices and discounts must be zero or more")]
    Negative { input: String },
    #[error("{input:?} is not a plain decimal number such as \"2.50\" (digits, at most one '.', no sign, exponent, spaces or separators)")]
    Malformed { input: String },
    #[error(
        "{input:?} has more than {max_decimals} decimals, which cannot be represented exactly"
    )]
    TooPrecise { input: String, max_decimals: u32 },
    #[error("{input:?} is larger than the maximum of {max}")]
    TooLarge { input: String, max: &'static str },
}

/// Parses a non-negative decimal string into `value × 10^scale` exactly. Trailing zeros beyond `scale`
/// decimals are accepted (`"2.5000000"`); any other digit beyond it is [`DecimalError::TooPrecise`].
fn parse_decimal(s: &str, scale: u32) -> Result<i128, DecimalError> {
    let malformed = || DecimalError::Malformed {
        input: s.to_owned(),
    };
    if s.is_empty() {
        return Err(DecimalError::Empty);
    }
    if s.starts_with('-') {
        return Err(DecimalError::Negative {
            input: s.to_owned(),
        });
    }
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (s, None),
    };
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || frac.is_some_and(|f| !all_digits(f)) {
        return Err(malformed());
    }
    let too_large = || DecimalError::TooLarge {
        input: s.to_owned(),
        max: "the representable range",
    };
    let mut v: i128 = 0;
    for b in whole.bytes() {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add(i128::from(b - b'0')))
            .ok_or_else(too_large)?;
    }
    let frac = frac.unwrap_or("").trim_end_matches('0');
    if frac.len() > scale as usize {
        return Err(DecimalError::TooPrecise {
            input: s.to_owned(),
            max_decimals: scale,
        });
    }
    let mut f: i128 = 0;
    for b in frac.bytes() {
        f = f * 10 + i128::from(b - b'0');
    }
    // `frac.len() <= scale`, so the exponent is non-negative.
    let pad = 10i128.pow(scale - frac.len() as u32);
    v.checked_mul(10i128.pow(scale))
        .and_then(|v| v.checked_add(f * pad))
        .ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> u64 {
        TokenPrice::parse_per_million(s).unwrap().pico_per_token()
    }

    #[test]
    fn published_prices_are_exact_pico_per_token() {
        // $1 per 1M tokens = 1e12 pico / 1e6 tokens = 1e6 pico per token.
        assert_eq!(p("1"), 1_000_000);
        assert_eq!(p("2.50"), 2_500_000);
        assert_eq!(p("0.0375"), 37_500);
        assert_eq!(p("15"), 15_000_000);
        assert_eq!(p("0.075"), 75_000);
        assert_eq!(p("0.005"), 5_000);
        assert_eq!(p("0.000001"), 1);
        assert_eq!(p("0"), 0);
        assert_eq!(p("22.50"), 22_500_000);
        // Trailing zeros past the sixth decimal are still exact.
        assert_eq!(p("2.5000000000"), 2_500_000);
        assert_eq!(p("1000000"), MAX_PICO_PER_TOKEN);
    }

    #[test]
    fn bad_prices_are_rejected_with_the_reason() {
        let e = |s: &str| TokenPrice::parse_per_million(s).unwrap_err();
        assert!(matches!(
            e("0.0000001"),
            DecimalError::TooPrecise {
                max_decimals: 6,
                ..
            }
        ));
        assert!(matches!(e("1.2345678"), DecimalError::TooPrecise { .. }));
        assert!(matches!(e("-1"), DecimalError::Negative { .. }));
        assert!(matches!(e("-0.5"), DecimalError::Negative { .. }));
        assert_eq!(e(""), DecimalError::Empty);
        for garbage in [
            "abc", "1.2.3", ".5", "5.", "+1", "1e3", " 1", "1 ", "1_000", "$2.50", "2,50", "NaN",
            ".",
        ] {
            assert!(
                matches!(e(garbage), DecimalError::Malformed { .. }),
                "{garbage:?} should be malformed"
            );
        }
        assert!(matches!(e("1000000.000001"), DecimalError::TooLarge { .. }));
        // Overflow of the intermediate, not just the cap.
        assert!(matches!(
            e("999999999999999999999999999999999999999999"),
            DecimalError::TooLarge { .. }
        ));
        let msg = e("0.0000001").to_string();
        assert!(
            msg.contains("0.0000001") && msg.contains("6 decimals"),
            "{msg}"
        );
    }

    #[test]
    fn money_displays_as_trimmed_usd() {
        assert_eq!(Money::from_pico(125_000_000).to_string(), "$0.000125");
        assert_eq!(Money::from_pico(12_500_000_000_000).to_string(), "$12.5");
        assert_eq!(Money::from_pico(3 * PICO_PER_USD).to_string(), "$3");
        assert_eq!(Money::ZERO.to_string(), "$0");
        assert_eq!(Money::from_pico(1).to_string(), "$0.000000000001");
        assert_eq!(Money::from_pico(-10_000_000_000).to_string(), "-$0.01");
        assert_eq!(Money::from_pico(125_000_000).usd(), "0.000125");
        assert_eq!(Money::from_pico(-10_000_000_000).usd(), "-0.01");
        assert_eq!(
            Money::from_pico(i128::MIN).usd(),
            "-170141183460469231731687303.715884105728"
        );
    }

    #[test]
    fn money_parses_usd_and_round_trips() {
        let m = Money::parse_usd("0.000125").unwrap();
        assert_eq!(m.pico(), 125_000_000);
        assert_eq!(Money::parse_usd(&m.usd()).unwrap(), m);
        assert!(Money::parse_usd("0.0000000000001").is_err());
        assert!(Money::parse_usd("-1").is_err());
    }

    #[test]
    fn money_arithmetic_is_checked() {
        let max = Money::from_pico(i128::MAX);
        assert_eq!(max.checked_add(Money::from_pico(1)), None);
        assert_eq!(
            Money::from_pico(i128::MIN).checked_sub(Money::from_pico(1)),
            None
        );
        assert_eq!(max.checked_mul(2), None);
        assert_eq!(
            Money::from_pico(2).checked_add(Money::from_pico(3)),
            Some(Money::from_pico(5))
        );
        assert_eq!(
            Money::from_pico(2).checked_sub(Money::from_pico(3)),
            Some(Money::from_pico(-1))
        );
    }

    #[test]
    fn token_price_times_cannot_overflow_at_the_cap() {
        let max = TokenPrice::from_pico_per_token(MAX_PICO_PER_TOKEN).unwrap();
        let one = max.times(u64::MAX);
        // Five token classes at the cap still fit.
        assert!(one.checked_mul(5).is_some());
        assert_eq!(
            TokenPrice::from_pico_per_token(MAX_PICO_PER_TOKEN + 1),
            None
        );
    }

    #[test]
    fn token_price_and_percent_display() {
        assert_eq!(
            TokenPrice::parse_per_million("2.50").unwrap().to_string(),
            "$2.5/1M"
        );
        assert_eq!(Percent::parse("12.5").unwrap().to_string(), "12.5%");
        assert_eq!(Percent::parse("12.5").unwrap().ppm(), 125_000);
        assert_eq!(Percent::parse("100").unwrap().ppm(), Percent::WHOLE_PPM);
        assert_eq!(Percent::parse("0").unwrap().ppm(), 0);
        assert!(matches!(
            Percent::parse("100.0001"),
            Err(DecimalError::TooLarge { .. })
        ));
        assert!(matches!(
            Percent::parse("1.00001"),
            Err(DecimalError::TooPrecise { .. })
        ));
        assert!(matches!(
            Percent::parse("-5"),
            Err(DecimalError::Negative { .. })
        ));
    }

    #[test]
    fn money_serialises_as_integer_pico() {
        let m = Money::from_pico(125_000_000);
        assert_eq!(serde_json::to_string(&m).unwrap(), "125000000");
        assert_eq!(serde_json::from_str::<Money>("125000000").unwrap(), m);
        let p = TokenPrice::parse_per_million("2.50").unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), "2500000");
    }
}
