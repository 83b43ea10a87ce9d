//! Time as every tier stores it: whole microseconds since the Unix epoch.
//!
//! Versions are clock values in microseconds (see [`crate::Version`]), and
//! every tier keeps record times at that precision; a time with nanoseconds
//! would not survive a round trip through a tier. So the engine takes its
//! times from [`now`], and tiers convert with [`Micros`], here and nowhere
//! else.

use time::OffsetDateTime;

use crate::{StoreError, StoreResult, Tier};

/// Wall-clock time at the precision the tiers store (microseconds).
pub fn now() -> OffsetDateTime {
    Micros::truncate(OffsetDateTime::now_utc())
}

/// A point in time as a tier stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(i64);

impl Micros {
    /// A stored value, as read back from a tier.
    pub const fn new(value: i64) -> Self {
        Micros(value)
    }

    /// `at`, without its nanoseconds.
    pub fn of(at: OffsetDateTime) -> Self {
        Micros((at.unix_timestamp_nanos() / 1_000) as i64)
    }

    pub const fn get(self) -> i64 {
        self.0
    }

    /// The time this value stands for; a value no time stands for means
    /// the tier holds something it did not write (`tier` names it).
    pub fn time(self, tier: Tier) -> StoreResult<OffsetDateTime> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000)
            .map_err(|err| StoreError::internal(tier, format!("bad stored time {}: {err}", self.0)))
    }

    /// `at` as it reads back from a tier.
    pub fn truncate(at: OffsetDateTime) -> OffsetDateTime {
        at.replace_nanosecond(at.nanosecond() / 1_000 * 1_000)
            .unwrap_or(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_survives_the_round_trip_at_microseconds() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        let stored = Micros::of(at);
        assert_eq!(stored.get(), 1_700_000_000_123_456);
        assert_eq!(stored.time(Tier::Cache).unwrap(), Micros::truncate(at));
        assert!(Micros::new(i64::MAX).time(Tier::Durable).is_err());
    }
}
