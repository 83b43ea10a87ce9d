//! Counter totals: increments applied once each, snapshots, export and import.

use super::*;

/// Marks increments applied; answers the ids that were not applied before.
const CLAIM_OPS: &str = "INSERT INTO counter_ops (op_id) SELECT unnest($1::text[]) \
    ON CONFLICT DO NOTHING RETURNING op_id";

/// Adds summed deltas, one row per (scope, bucket, field).
const ADD_TO_COUNTERS: &str = "INSERT INTO counters AS c \
    (scope, granularity, bucket_start, field, value, expires_at) \
    SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], \
        $5::text[]::numeric[], $6::timestamptz[]) \
    ON CONFLICT (scope, granularity, bucket_start, field) \
    DO UPDATE SET value = c.value + EXCLUDED.value, expires_at = EXCLUDED.expires_at \
    RETURNING field, abs(value) > $7::numeric AS out_of_range";

/// Counter values after a (scope, granularity, start, field) position
/// (`$1` NULL: from the start), not expired at `$5`.
const SCAN_COUNTERS: &str = "SELECT scope, granularity, bucket_start, field, \
    value::text AS value, expires_at FROM counters \
    WHERE ($1::text IS NULL OR (scope, granularity, bucket_start, field) > ($1, $2, $3, $4)) \
    AND (expires_at IS NULL OR expires_at > $5) \
    ORDER BY scope, granularity, bucket_start, field LIMIT $6";

/// Sets one counter value where none is held (or over it, `$7` forcing).
const RESTORE_COUNTER: &str = "INSERT INTO counters AS c \
    (scope, granularity, bucket_start, field, value, expires_at) \
    VALUES ($1, $2, $3, $4, $5::numeric, $6) \
    ON CONFLICT (scope, granularity, bucket_start, field) \
    DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at WHERE $7 \
    RETURNING 1";

fn counter_value_from_row(row: &PgRow) -> StoreResult<CounterValue> {
    let bad = |err: String| StoreError::internal(Tier::Durable, err);
    let scope: String = row.try_get("scope").map_err(classify)?;
    let granularity: String = row.try_get("granularity").map_err(classify)?;
    let field: String = row.try_get("field").map_err(classify)?;
    let value: String = row.try_get("value").map_err(classify)?;
    Ok(CounterValue {
        scope: CounterScope::parse(&scope).map_err(|err| bad(err.to_string()))?,
        granularity: Granularity::parse(&granularity)
            .ok_or_else(|| bad(format!("unknown granularity {granularity:?}")))?,
        bucket_start: row.try_get("bucket_start").map_err(classify)?,
        field: FieldName::parse(&field).map_err(|err| bad(err.to_string()))?,
        value: Amount::parse_stored(&value).map_err(bad)?,
        expires_at: row.try_get("expires_at").map_err(classify)?,
    })
}

/// Rows of [`COUNTER_BUCKETS`], grouped by bucket in
/// the order they came.
fn bucket_values(rows: &[PgRow]) -> StoreResult<Vec<BucketValues>> {
    let mut grouped: Vec<BucketValues> = Vec::new();
    for row in rows {
        let granularity: String = row.try_get("granularity").map_err(classify)?;
        let granularity = Granularity::parse(&granularity)
            .ok_or_else(|| StoreError::internal(Tier::Durable, "unknown granularity"))?;
        let start: OffsetDateTime = row.try_get("bucket_start").map_err(classify)?;
        let field: String = row.try_get("field").map_err(classify)?;
        let field =
            FieldName::parse(&field).map_err(|err| StoreError::internal(Tier::Durable, err))?;
        let value: String = row.try_get("value").map_err(classify)?;
        let value =
            Amount::parse_stored(&value).map_err(|err| StoreError::internal(Tier::Durable, err))?;
        let expires_at = row.try_get("expires_at").map_err(classify)?;
        match grouped.last_mut() {
            Some(last) if last.bucket.granularity == granularity && last.bucket.start == start => {
                last.values.push((field, value));
            }
            _ => grouped.push(BucketValues {
                bucket: Bucket {
                    granularity,
                    start,
                    expires_at,
                },
                values: vec![(field, value)],
            }),
        }
    }
    Ok(grouped)
}

const COUNTER_BUCKETS: &str = "SELECT granularity, bucket_start, field, value::text AS value, \
    expires_at FROM counters WHERE scope = $1 AND (granularity, bucket_start) IN \
    (SELECT * FROM unnest($2::text[], $3::timestamptz[])) \
    ORDER BY granularity, bucket_start, field";

#[async_trait]
impl DurableCounters for PostgresStore {
    #[tracing::instrument(level = "debug", skip_all, fields(count = increments.len()))]
    async fn apply_increments(&self, increments: &[CounterIncrement]) -> StoreResult<usize> {
        if increments.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let ids: Vec<&str> = increments.iter().map(|i| i.op_id.as_str()).collect();
        let fresh: HashSet<String> = sqlx::query_scalar(CLAIM_OPS)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?
            .into_iter()
            .collect();
        // One row per (scope, bucket, field): many increments, one upsert.
        type RowKey = (String, Granularity, OffsetDateTime, String);
        let mut sums: BTreeMap<RowKey, (Amount, Option<OffsetDateTime>)> = BTreeMap::new();
        for increment in increments.iter().filter(|i| fresh.contains(&i.op_id)) {
            for bucket in &increment.buckets {
                for (field, delta) in &increment.deltas {
                    let key = (
                        increment.scope.to_string(),
                        bucket.granularity,
                        bucket.start,
                        field.to_string(),
                    );
                    let entry = sums.entry(key).or_insert((Amount::ZERO, bucket.expires_at));
                    entry.0 = entry.0.add_to_total(*delta).ok_or_else(|| {
                        StoreError::CounterOutOfRange {
                            field: field.to_string(),
                        }
                    })?;
                }
            }
        }
        if !sums.is_empty() {
            let mut columns = (
                Vec::with_capacity(sums.len()),
                Vec::with_capacity(sums.len()),
                Vec::with_capacity(sums.len()),
                Vec::with_capacity(sums.len()),
                Vec::with_capacity(sums.len()),
                Vec::with_capacity(sums.len()),
            );
            for ((scope, granularity, start, field), (sum, expires_at)) in sums {
                columns.0.push(scope);
                columns.1.push(granularity.as_str());
                columns.2.push(start);
                columns.3.push(field);
                columns.4.push(sum.to_string());
                columns.5.push(expires_at);
            }
            let totals: Vec<(String, bool)> = sqlx::query_as(ADD_TO_COUNTERS)
                .bind(columns.0)
                .bind(columns.1)
                .bind(columns.2)
                .bind(columns.3)
                .bind(columns.4)
                .bind(columns.5)
                .bind(MAX_TOTAL_UNITS.to_string())
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?;
            // Dropping the transaction rolls the whole increment back.
            if let Some((field, _)) = totals.into_iter().find(|(_, out)| *out) {
                return Err(StoreError::CounterOutOfRange { field });
            }
        }
        tx.commit().await.map_err(classify)?;
        Ok(fresh.len())
    }

    async fn counter_snapshot(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        op_ids: &[String],
    ) -> StoreResult<(Vec<BucketValues>, HashSet<String>)> {
        let granularities: Vec<&str> = buckets.iter().map(|b| b.granularity.as_str()).collect();
        let starts: Vec<OffsetDateTime> = buckets.iter().map(|b| b.start).collect();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        if !op_ids.is_empty() {
            // Both reads must see the same commits.
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
        }
        let rows = sqlx::query(COUNTER_BUCKETS)
            .bind(scope.as_str())
            .bind(&granularities)
            .bind(&starts)
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        let applied: HashSet<String> = if op_ids.is_empty() {
            HashSet::new()
        } else {
            sqlx::query_scalar("SELECT op_id FROM counter_ops WHERE op_id = ANY($1)")
                .bind(op_ids)
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?
                .into_iter()
                .collect()
        };
        tx.commit().await.map_err(classify)?;
        Ok((bucket_values(&rows)?, applied))
    }

    async fn scan_counters(
        &self,
        after: Option<&CounterValue>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<CounterValue>> {
        let rows = sqlx::query(SCAN_COUNTERS)
            .bind(after.map(|a| a.scope.as_str()))
            .bind(after.map(|a| a.granularity.as_str()))
            .bind(after.map(|a| a.bucket_start))
            .bind(after.map(|a| a.field.as_str()))
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.iter().map(counter_value_from_row).collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(count = values.len()))]
    async fn restore_counters(
        &self,
        values: &[CounterValue],
        force: bool,
    ) -> StoreResult<Vec<bool>> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let mut written = Vec::with_capacity(values.len());
        for value in values {
            let row = sqlx::query(RESTORE_COUNTER)
                .bind(value.scope.as_str())
                .bind(value.granularity.as_str())
                .bind(value.bucket_start)
                .bind(value.field.as_str())
                .bind(value.value.to_string())
                .bind(value.expires_at)
                .bind(force)
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
            written.push(row.is_some());
        }
        tx.commit().await.map_err(classify)?;
        Ok(written)
    }
}
