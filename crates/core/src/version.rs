//! Record versions.
//!
//! A version totally orders the writes of one record across both tiers: every
//! cache fill, sync and replay compares versions and never lets a lower one replace
//! a higher one. Versions are hybrid-clock values: the next version of a record is
//! `max(previous + 1, now in microseconds since the Unix epoch)`. That keeps them
//! strictly increasing per record (the `+ 1`), and also increasing across a delete
//! followed by a re-create, or a write accepted by another tier that does not know
//! the previous version, because the clock has moved on (the `now`).
//! Clients must treat versions as opaque and compare them only for equality
//! (`If-Match`) or order.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Version(u64);

impl Version {
    /// The highest version every tier can store: PostgreSQL and SQLite keep
    /// versions as signed 64-bit integers. Clock-based versions stay far
    /// below it (microseconds since 1970 reach it in the year 294,247); a
    /// version above it can only come from a client, and is refused there.
    pub const MAX: Version = Version(i64::MAX as u64);

    pub const fn new(value: u64) -> Self {
        Version(value)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The version of the next write after `previous`, at wall-clock time `now`.
    pub fn next(previous: Option<Version>, now: OffsetDateTime) -> Version {
        let clock = Self::clock(now);
        match previous {
            Some(prev) => Version(clock.max(prev.0.saturating_add(1))),
            None => Version(clock),
        }
    }

    /// Microseconds since the Unix epoch (never below 1).
    pub fn clock(now: OffsetDateTime) -> u64 {
        let micros = now.unix_timestamp_nanos() / 1_000;
        u64::try_from(micros).unwrap_or(0).max(1)
    }

    /// The version as the durable tiers store it (a signed 64-bit
    /// integer); one above [`Version::MAX`] cannot be stored.
    pub fn to_i64(self) -> crate::StoreResult<i64> {
        i64::try_from(self.0)
            .map_err(|_| crate::StoreError::internal(crate::Tier::Durable, "version out of range"))
    }

    /// A version as a durable tier stored it.
    pub fn from_i64(value: i64) -> Version {
        Version(value.max(0) as u64)
    }

    /// Fixed-width decimal form, so that byte-wise string comparison orders
    /// versions correctly (used where only strings compare, e.g. Lua in Redis).
    pub fn to_padded(self) -> String {
        format!("{:020}", self.0)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// Why a text is not a version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionParseError {
    /// Not a decimal number.
    Invalid,
    /// A number above [`Version::MAX`].
    OutOfRange,
}

impl fmt::Display for VersionParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid => write!(f, "a version is a decimal number"),
            Self::OutOfRange => write!(f, "a version is at most {}", Version::MAX),
        }
    }
}

impl std::error::Error for VersionParseError {}

impl FromStr for Version {
    type Err = VersionParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(VersionParseError::Invalid);
        }
        match s.parse::<u64>() {
            Ok(value) if value <= Self::MAX.0 => Ok(Version(value)),
            _ => Err(VersionParseError::OutOfRange),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn a_version_above_what_every_tier_stores_is_refused() {
        assert_eq!("9223372036854775807".parse(), Ok(Version::MAX));
        for text in [
            "9223372036854775808",
            "18446744073709551615",
            "99999999999999999999",
        ] {
            assert_eq!(text.parse::<Version>(), Err(VersionParseError::OutOfRange));
        }
        for text in ["", "-1", "+1", "1.0", "x"] {
            assert_eq!(text.parse::<Version>(), Err(VersionParseError::Invalid));
        }
    }

    #[test]
    fn next_follows_the_clock() {
        let now = datetime!(2026-01-01 0:00 UTC);
        let v = Version::next(None, now);
        assert_eq!(v.get(), 1_767_225_600_000_000);
        assert_eq!(
            Version::next(Some(Version::new(5)), now),
            v,
            "clock wins over an old version"
        );
    }

    #[test]
    fn next_is_strictly_greater_than_previous() {
        let now = datetime!(2026-01-01 0:00 UTC);
        let ahead = Version::new(Version::clock(now) + 10);
        assert_eq!(Version::next(Some(ahead), now).get(), ahead.get() + 1);
    }

    #[test]
    fn padded_form_orders_like_numbers() {
        let a = Version::new(9).to_padded();
        let b = Version::new(10).to_padded();
        assert!(a < b);
        assert_eq!(a.len(), 20);
    }
}
