//! Usage counters: exact decimal amounts rolled into time buckets.
//!
//! Amounts are kept as integers of nano-units (10^-9), so adding a million
//! increments of 0.000001 gives exactly 1: no binary floating point is ever
//! summed. A delta arrives as a JSON number and is converted from its decimal
//! text, never through an `f64` sum; one with more than nine decimals is
//! refused rather than rounded.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::{Date, Month, OffsetDateTime, Time};

use crate::{CounterScope, FieldName};

const NANOS_PER_UNIT: i128 = 1_000_000_000;
/// Largest |delta| accepted, in units.
/// How long every tier remembers the id of an increment it applied, so
/// that a retry or a second replay of it changes nothing (those come within
/// seconds; an id older than this may be applied again).
pub const OP_ID_RETENTION: std::time::Duration = std::time::Duration::from_secs(2 * 86_400);

pub const MAX_DELTA_UNITS: i128 = 1_000_000_000_000_000;
/// Largest |value| a stored amount (a sum of deltas) is read back with, in
/// units: within Redis's signed 64-bit units (9.2 * 10^18), PostgreSQL's
/// `numeric(40,9)` and SQLite's text. Sums of legal deltas pass
/// [`MAX_DELTA_UNITS`] after two of them; they must still read, export and
/// restore.
pub const MAX_TOTAL_UNITS: i128 = 1_000_000_000_000_000_000;

/// An exact decimal amount with nine decimals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount {
    nanos: i128,
}

impl Amount {
    pub const ZERO: Amount = Amount { nanos: 0 };

    pub fn from_nanos(nanos: i128) -> Self {
        Self { nanos }
    }

    pub fn nanos(self) -> i128 {
        self.nanos
    }

    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.nanos.checked_add(other.nanos).map(Amount::from_nanos)
    }

    /// True when a tier may keep this as a total: |value| <= [`MAX_TOTAL_UNITS`].
    /// Every tier refuses an increment that would take a total past it, so
    /// what was accepted always reads back, exports and restores.
    pub fn is_storable_total(self) -> bool {
        self.nanos.unsigned_abs() <= (MAX_TOTAL_UNITS * NANOS_PER_UNIT) as u128
    }

    /// `self + delta` when the sum is a storable total
    /// ([`Amount::is_storable_total`]).
    pub fn add_to_total(self, delta: Amount) -> Option<Amount> {
        self.checked_add(delta)
            .filter(|sum| sum.is_storable_total())
    }

    /// Whole units (toward minus infinity) and the nano remainder in
    /// `0..10^9`, as the cache tier stores them.
    pub fn split(self) -> (i128, i64) {
        let units = self.nanos.div_euclid(NANOS_PER_UNIT);
        let nanos = self.nanos.rem_euclid(NANOS_PER_UNIT) as i64;
        (units, nanos)
    }

    pub fn from_parts(units: i128, nanos: i64) -> Option<Self> {
        units
            .checked_mul(NANOS_PER_UNIT)?
            .checked_add(i128::from(nanos))
            .map(Amount::from_nanos)
    }

    /// Parses the decimal text of a JSON number (`12`, `0.012`, `1e-6`) as a
    /// delta: at most [`MAX_DELTA_UNITS`].
    pub fn parse_decimal(text: &str) -> Result<Self, String> {
        Self::parse_within(text, MAX_DELTA_UNITS)
    }

    /// Parses a stored amount (a sum of deltas, as a tier or an export line
    /// holds it): at most [`MAX_TOTAL_UNITS`].
    pub fn parse_stored(text: &str) -> Result<Self, String> {
        Self::parse_within(text, MAX_TOTAL_UNITS)
    }

    fn parse_within(text: &str, max_units: i128) -> Result<Self, String> {
        let bad = || format!("{text} is not a decimal number");
        let (mantissa, exponent) = match text.find(['e', 'E']) {
            Some(at) => (
                &text[..at],
                text[at + 1..].parse::<i32>().map_err(|_| bad())?,
            ),
            None => (text, 0),
        };
        let (negative, mantissa) = match mantissa.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, mantissa),
        };
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if whole.is_empty()
            || !whole.bytes().all(|b| b.is_ascii_digit())
            || !fraction.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let digits = format!("{whole}{fraction}");
        let digits = digits.trim_start_matches('0');
        // value = digits * 10^(exponent - fraction.len()); in nanos: + 9.
        let scale = i64::from(exponent) - fraction.len() as i64 + 9;
        let mut significant = digits.to_owned();
        let mut scale = scale;
        while scale < 0 {
            match significant.strip_suffix('0') {
                Some(rest) => significant = rest.to_owned(),
                None if significant.is_empty() => break,
                None => return Err(format!("{text} has more than 9 decimals")),
            }
            scale += 1;
        }
        let too_large = || format!("{text} is too large (at most {max_units})");
        if significant.is_empty() {
            return Ok(Amount::ZERO);
        }
        if significant.len() as i64 + scale.max(0) > 30 {
            return Err(too_large());
        }
        let mut nanos: i128 = significant.parse().map_err(|_| bad())?;
        for _ in 0..scale.max(0) {
            nanos = nanos.checked_mul(10).ok_or_else(too_large)?;
        }
        if nanos > max_units * NANOS_PER_UNIT {
            return Err(too_large());
        }
        Ok(Amount::from_nanos(if negative { -nanos } else { nanos }))
    }
}

impl Serialize for Amount {
    /// As its exact decimal text.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Amount::parse_stored(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Amount {
    /// The exact decimal, without trailing zeros.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.nanos < 0 { "-" } else { "" };
        let magnitude = self.nanos.unsigned_abs();
        let units = magnitude / NANOS_PER_UNIT as u128;
        let nanos = magnitude % NANOS_PER_UNIT as u128;
        if nanos == 0 {
            write!(f, "{sign}{units}")
        } else {
            let fraction = format!("{nanos:09}");
            write!(f, "{sign}{units}.{}", fraction.trim_end_matches('0'))
        }
    }
}

/// The bucket sizes every increment is rolled into (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Total,
    Hour,
    Day,
    Month,
}

impl Granularity {
    pub const ALL: [Granularity; 4] = [
        Granularity::Total,
        Granularity::Hour,
        Granularity::Day,
        Granularity::Month,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Total => "total",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Month => "month",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == text)
    }

    /// The start of the bucket holding `at` (the epoch for `total`).
    pub fn bucket_start(self, at: OffsetDateTime) -> OffsetDateTime {
        let at = at.to_offset(time::UtcOffset::UTC);
        let date = at.date();
        match self {
            Granularity::Total => OffsetDateTime::UNIX_EPOCH,
            Granularity::Hour => date
                .with_time(Time::from_hms(at.hour(), 0, 0).expect("valid hour"))
                .assume_utc(),
            Granularity::Day => date.midnight().assume_utc(),
            Granularity::Month => Date::from_calendar_date(date.year(), date.month(), 1)
                .expect("the first of a month exists")
                .midnight()
                .assume_utc(),
        }
    }

    /// The start of the bucket after the one starting at `start` (`None`
    /// for `total`, which never ends).
    pub fn bucket_end(self, start: OffsetDateTime) -> Option<OffsetDateTime> {
        match self {
            Granularity::Total => None,
            Granularity::Hour => Some(start + time::Duration::HOUR),
            Granularity::Day => Some(start + time::Duration::DAY),
            Granularity::Month => {
                let (year, month) = match start.month() {
                    Month::December => (start.year() + 1, Month::January),
                    month => (start.year(), month.next()),
                };
                Some(
                    Date::from_calendar_date(year, month, 1)
                        .expect("the first of a month exists")
                        .midnight()
                        .assume_utc(),
                )
            }
        }
    }

    /// The bucket's label in keys and answers: `total`, `2026-11-22T05`,
    /// `2026-11-22`, `2026-11`.
    pub fn label(self, start: OffsetDateTime) -> String {
        match self {
            Granularity::Total => "total".to_owned(),
            Granularity::Hour => format!("{}T{:02}", start.date(), start.hour()),
            Granularity::Day => start.date().to_string(),
            Granularity::Month => format!("{}-{:02}", start.year(), u8::from(start.month())),
        }
    }

    /// The granularity and bucket start a [`Granularity::label`] names.
    pub fn parse_label(label: &str) -> Option<(Granularity, OffsetDateTime)> {
        let date = |text: &str| {
            let format = time::macros::format_description!("[year]-[month]-[day]");
            Date::parse(text, &format).ok()
        };
        let parsed = match label.len() {
            5 if label == "total" => (Granularity::Total, OffsetDateTime::UNIX_EPOCH),
            7 => (
                Granularity::Month,
                date(&format!("{label}-01"))?.midnight().assume_utc(),
            ),
            10 => (Granularity::Day, date(label)?.midnight().assume_utc()),
            13 => {
                let (day, hour) = label.split_once('T')?;
                let hour: u8 = hour.parse().ok()?;
                let at = date(day)?.with_time(Time::from_hms(hour, 0, 0).ok()?);
                (Granularity::Hour, at.assume_utc())
            }
            _ => return None,
        };
        // Only the one spelling `label` gives.
        (parsed.0.label(parsed.1) == label).then_some(parsed)
    }
}

/// One bucket of one scope.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Bucket {
    pub granularity: Granularity,
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// When it leaves reads and storage (`None`: kept forever).
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

impl Bucket {
    /// When a cache tier lets this bucket go: `idle` after its last
    /// increment or seeding (`CACHE_USAGE_STATS_TTL`), or when it leaves
    /// storage, whichever comes first. A bucket let go is seeded again from
    /// the durable tier (and the journal) on its next use, so this bounds
    /// the cache's memory to the scopes in use without losing a count.
    pub fn cache_expiry(&self, idle: std::time::Duration, now: OffsetDateTime) -> OffsetDateTime {
        let idle_end = now + idle;
        self.expires_at.map_or(idle_end, |end| end.min(idle_end))
    }
}

/// One increment, ready for the tiers (and, as JSON, a journal entry).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CounterIncrement {
    /// Unique per increment: the durable tier applies each id once.
    pub op_id: String,
    pub scope: CounterScope,
    pub deltas: Vec<(FieldName, Amount)>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The buckets `at` falls into that are still retained.
    pub buckets: Vec<Bucket>,
}

/// The values of one bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct BucketValues {
    pub bucket: Bucket,
    pub values: Vec<(FieldName, Amount)>,
}

/// What a seeder saw of its scope's buckets before it read the values it
/// is about to install: a cache tier installs them only if none of the
/// scope's buckets was dropped since.
///
/// Why: between reading the durable tier and installing, another seeder may
/// install the bucket, increments land in it, and then the bucket is dropped
/// (an increment went around the cache, or incomplete values were let go).
/// Installing then would put values that miss those increments in place,
/// marked complete. The ticket (a drop count per shard of scopes) tells the
/// tier a drop happened; the increment finds the bucket cold and seeds again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeedTicket(pub u64);

/// What the cache tier did with an increment.
#[derive(Clone, Debug, PartialEq)]
pub enum CacheIncrementOutcome {
    /// Applied and journaled; the new values of every bucket, and whether
    /// each bucket's values are complete (seeded from the durable tier).
    Applied(Vec<(BucketValues, bool)>),
    /// These buckets are not in the cache: seed them and try again.
    Cold(Vec<Bucket>),
    /// This increment (its id) was applied before; nothing changed.
    Duplicate,
}

/// One stored counter value: a field of one bucket of one scope, as export
/// and import carry it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterValue {
    pub scope: CounterScope,
    pub granularity: Granularity,
    #[serde(with = "time::serde::rfc3339")]
    pub bucket_start: OffsetDateTime,
    pub field: FieldName,
    pub value: Amount,
    #[serde(
        with = "time::serde::rfc3339::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
}

/// A journaled increment, as read for replay.
#[derive(Clone, Debug)]
pub struct CounterJournalEntry {
    pub position: crate::JournalPosition,
    pub increment: CounterIncrement,
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn amount(text: &str) -> Amount {
        Amount::parse_decimal(text).unwrap()
    }

    #[test]
    fn labels_name_their_bucket_and_parse_back() {
        let at = datetime!(2026-11-22 05:42:10 UTC);
        for granularity in Granularity::ALL {
            let start = granularity.bucket_start(at);
            let label = granularity.label(start);
            assert_eq!(
                Granularity::parse_label(&label),
                Some((granularity, start)),
                "{label}"
            );
        }
        for bad in [
            "",
            "tota",
            "2026-13",
            "2026-11-31",
            "2026-11-22T24",
            "2026-11-22T5",
            "2026-1-02",
        ] {
            assert_eq!(Granularity::parse_label(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(amount("12").nanos(), 12_000_000_000);
        assert_eq!(amount("0.012").nanos(), 12_000_000);
        assert_eq!(amount("1e-6").nanos(), 1_000);
        assert_eq!(amount("-2.5").nanos(), -2_500_000_000);
        assert_eq!(amount("1.5E3").nanos(), 1_500_000_000_000);
        assert_eq!(amount("0.000000001").nanos(), 1);
        assert_eq!(amount("0.0"), Amount::ZERO);
        assert!(
            Amount::parse_decimal("0.0000000001").is_err(),
            "10 decimals"
        );
        assert!(Amount::parse_decimal("1e16").is_err(), "too large");
        assert_eq!(
            Amount::parse_stored("1200000000000000.5").map(|a| a.to_string()),
            Ok("1200000000000000.5".to_owned()),
            "a sum of legal deltas reads back"
        );
        assert!(Amount::parse_stored("1e19").is_err());
        assert!(Amount::parse_decimal("abc").is_err());
        let mut sum = Amount::ZERO;
        for _ in 0..1_000_000 {
            sum = sum.checked_add(amount("0.000001")).unwrap();
        }
        assert_eq!(sum.to_string(), "1");
        assert_eq!(amount("-0.25").to_string(), "-0.25");
        assert_eq!(amount("-0.25").split(), (-1, 750_000_000));
        assert_eq!(Amount::from_parts(-1, 750_000_000), Some(amount("-0.25")));
        let top = Amount::parse_stored("1000000000000000000").unwrap();
        assert!(top.is_storable_total());
        assert_eq!(top.add_to_total(amount("0.000000001")), None);
        assert_eq!(
            top.add_to_total(amount("-1")).map(|a| a.to_string()),
            Some("999999999999999999".to_owned())
        );
        let bottom = Amount::ZERO.checked_add(top).unwrap();
        let bottom = Amount::from_nanos(-bottom.nanos());
        assert!(bottom.is_storable_total());
        assert_eq!(bottom.add_to_total(amount("-0.5")), None);
    }

    #[test]
    fn buckets_follow_the_utc_calendar() {
        let at = datetime!(2026-12-31 23:59:59.5 UTC);
        let month = Granularity::Month.bucket_start(at);
        assert_eq!(month, datetime!(2026-12-01 0:00 UTC));
        assert_eq!(
            Granularity::Month.bucket_end(month),
            Some(datetime!(2027-01-01 0:00 UTC))
        );
        let hour = Granularity::Hour.bucket_start(at);
        assert_eq!(Granularity::Hour.label(hour), "2026-12-31T23");
        assert_eq!(Granularity::Day.label(at), "2026-12-31");
        assert_eq!(Granularity::Month.label(month), "2026-12");
        assert_eq!(
            Granularity::Total.bucket_end(OffsetDateTime::UNIX_EPOCH),
            None
        );
        let offset = datetime!(2026-06-01 01:30 +02:00);
        assert_eq!(
            Granularity::Day.bucket_start(offset),
            datetime!(2026-05-31 0:00 UTC),
            "UTC days"
        );
    }
}
