//! Counter totals: increments applied once each, snapshots, export and import.

use super::*;

const SCAN_COUNTERS: &str = "SELECT scope, granularity, bucket_start, field, nanos, expires_at \
    FROM counters \
    WHERE (?1 IS NULL OR (scope, granularity, bucket_start, field) > (?1, ?2, ?3, ?4)) \
    AND (expires_at IS NULL OR expires_at > ?5) \
    ORDER BY scope, granularity, bucket_start, field LIMIT ?6";

fn apply_increments_in(tx: &Connection, increments: &[CounterIncrement]) -> StoreResult<usize> {
    let applied_at = Micros::of(OffsetDateTime::now_utc()).get();
    // One value per (scope, bucket, field): many increments, one write.
    type ValueKey = (String, Granularity, i64, String);
    let mut sums: BTreeMap<ValueKey, (Amount, Option<i64>)> = BTreeMap::new();
    let mut fresh = 0;
    for increment in increments {
        let new = tx
            .prepare_cached(
                "INSERT INTO counter_ops (op_id, applied_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )
            .and_then(|mut statement| statement.execute(params![increment.op_id, applied_at]))
            .map_err(classify)?;
        if new == 0 {
            continue;
        }
        fresh += 1;
        for bucket in &increment.buckets {
            for (field, delta) in &increment.deltas {
                let key = (
                    increment.scope.to_string(),
                    bucket.granularity,
                    Micros::of(bucket.start).get(),
                    field.to_string(),
                );
                let entry = sums.entry(key).or_insert((
                    Amount::ZERO,
                    bucket.expires_at.map(|at| Micros::of(at).get()),
                ));
                entry.0 =
                    entry
                        .0
                        .add_to_total(*delta)
                        .ok_or_else(|| StoreError::CounterOutOfRange {
                            field: field.to_string(),
                        })?;
            }
        }
    }
    for ((scope, granularity, start, field), (sum, expires_at)) in sums {
        let held: Option<String> = tx
            .prepare_cached(
                "SELECT nanos FROM counters \
                 WHERE scope = ?1 AND granularity = ?2 AND bucket_start = ?3 AND field = ?4",
            )
            .and_then(|mut statement| {
                statement
                    .query_row(params![scope, granularity.as_str(), start, field], |row| {
                        row.get(0)
                    })
                    .optional()
            })
            .map_err(classify)?;
        let total = match held {
            Some(held) => {
                amount_from(&held)?
                    .add_to_total(sum)
                    .ok_or(StoreError::CounterOutOfRange {
                        field: field.clone(),
                    })?
            }
            None => sum,
        };
        set_counter(
            tx,
            (&scope, granularity, start, &field),
            total,
            expires_at,
            true,
        )?;
    }
    Ok(fresh)
}

/// Sets one counter value (over a held one only when `replace`); whether it did.
fn set_counter(
    tx: &Connection,
    (scope, granularity, start, field): (&str, Granularity, i64, &str),
    value: Amount,
    expires_at: Option<i64>,
    replace: bool,
) -> StoreResult<bool> {
    tx.prepare_cached(SET_COUNTER)
        .and_then(|mut statement| {
            statement.execute(params![
                scope,
                granularity.as_str(),
                start,
                field,
                amount_param(value),
                expires_at,
                replace
            ])
        })
        .map(|changed| changed > 0)
        .map_err(classify)
}

fn amount_param(amount: Amount) -> String {
    amount.nanos().to_string()
}

const SET_COUNTER: &str = "INSERT INTO counters \
    (scope, granularity, bucket_start, field, nanos, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
    ON CONFLICT (scope, granularity, bucket_start, field) \
    DO UPDATE SET nanos = excluded.nanos, expires_at = excluded.expires_at WHERE ?7";

fn counter_value_from(
    row: &Row<'_>,
) -> rusqlite::Result<(String, String, i64, String, String, Option<i64>)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
    ))
}

fn decode_counter_value(
    (scope, granularity, start, field, nanos, expires_at): (
        String,
        String,
        i64,
        String,
        String,
        Option<i64>,
    ),
) -> StoreResult<CounterValue> {
    Ok(CounterValue {
        scope: CounterScope::parse(&scope).map_err(|err| corrupt(err.to_string()))?,
        granularity: Granularity::parse(&granularity)
            .ok_or_else(|| corrupt(format!("unknown granularity {granularity:?}")))?,
        bucket_start: Micros::new(start).time(Tier::Durable)?,
        field: FieldName::parse(&field).map_err(|err| corrupt(err.to_string()))?,
        value: amount_from(&nanos)?,
        expires_at: expires_at
            .map(|at| Micros::new(at).time(Tier::Durable))
            .transpose()?,
    })
}

fn amount_from(text: &str) -> StoreResult<Amount> {
    text.parse::<i128>()
        .map(Amount::from_nanos)
        .map_err(|_| corrupt(format!("bad stored counter value {text:?}")))
}

#[async_trait]
impl DurableCounters for SqliteStore {
    #[tracing::instrument(level = "debug", skip_all, fields(count = increments.len()))]
    async fn apply_increments(&self, increments: &[CounterIncrement]) -> StoreResult<usize> {
        if increments.is_empty() {
            return Ok(0);
        }
        let increments = increments.to_vec();
        self.write(move |tx| apply_increments_in(tx, &increments))
            .await
    }

    async fn counter_snapshot(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        op_ids: &[String],
    ) -> StoreResult<(Vec<BucketValues>, HashSet<String>)> {
        let (scope, buckets, op_ids) = (scope.clone(), buckets.to_vec(), op_ids.to_vec());
        // One read transaction: values and applied ids come from one snapshot.
        self.read(move |tx| {
            let mut values = Vec::new();
            for bucket in &buckets {
                let rows = query_all(
                    tx,
                    "SELECT field, nanos, expires_at FROM counters \
                     WHERE scope = ?1 AND granularity = ?2 AND bucket_start = ?3 ORDER BY field",
                    params![
                        scope.as_str(),
                        bucket.granularity.as_str(),
                        Micros::of(bucket.start).get()
                    ],
                    |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, Option<i64>>(2)?,
                        ))
                    },
                )?;
                let Some(expires_at) = rows.first().map(|row| row.2) else {
                    continue;
                };
                let mut fields = Vec::with_capacity(rows.len());
                for (field, nanos, _) in rows {
                    let field = FieldName::parse(&field).map_err(|err| corrupt(err.to_string()))?;
                    fields.push((field, amount_from(&nanos)?));
                }
                values.push(BucketValues {
                    bucket: Bucket {
                        granularity: bucket.granularity,
                        start: bucket.start,
                        expires_at: expires_at
                            .map(|at| Micros::new(at).time(Tier::Durable))
                            .transpose()?,
                    },
                    values: fields,
                });
            }
            let mut applied = HashSet::new();
            for op_id in op_ids {
                let known = query_all(
                    tx,
                    "SELECT 1 FROM counter_ops WHERE op_id = ?1",
                    [&op_id],
                    |_| Ok(()),
                )?;
                if !known.is_empty() {
                    applied.insert(op_id);
                }
            }
            Ok((values, applied))
        })
        .await
    }

    async fn scan_counters(
        &self,
        after: Option<&CounterValue>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<CounterValue>> {
        let after = after.cloned();
        self.read(move |tx| {
            let rows = query_all(
                tx,
                SCAN_COUNTERS,
                params![
                    after.as_ref().map(|a| a.scope.as_str()),
                    after.as_ref().map(|a| a.granularity.as_str()),
                    after.as_ref().map(|a| Micros::of(a.bucket_start).get()),
                    after.as_ref().map(|a| a.field.as_str()),
                    Micros::of(now).get(),
                    i64::try_from(limit).unwrap_or(i64::MAX),
                ],
                counter_value_from,
            )?;
            rows.into_iter().map(decode_counter_value).collect()
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(count = values.len()))]
    async fn restore_counters(
        &self,
        values: &[CounterValue],
        force: bool,
    ) -> StoreResult<Vec<bool>> {
        let values = values.to_vec();
        self.write(move |tx| {
            values
                .iter()
                .map(|value| {
                    set_counter(
                        tx,
                        (
                            value.scope.as_str(),
                            value.granularity,
                            Micros::of(value.bucket_start).get(),
                            value.field.as_str(),
                        ),
                        value.value,
                        value.expires_at.map(|at| Micros::of(at).get()),
                        force,
                    )
                })
                .collect()
        })
        .await
    }
}
