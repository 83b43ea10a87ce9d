//! Counter buckets and the increment journal.

use super::*;

/// When Redis lets `bucket` go, in ms since the epoch: after `idle`
/// without use, or (`None`: Redis holds the truth) at the end of its
/// retention; `''` for never.
fn expiry_arg(bucket: &Bucket, idle: Option<Duration>) -> String {
    let at = match idle {
        Some(idle) => Some(bucket.cache_expiry(idle, OffsetDateTime::now_utc())),
        None => bucket.expires_at,
    };
    at.map(|at| (at.unix_timestamp_nanos() / 1_000_000).to_string())
        .unwrap_or_default()
}

/// A bucket hash (`HGETALL`) as its values and whether they are complete.
fn decode_bucket(
    bucket: &Bucket,
    fields: Vec<(String, String)>,
) -> StoreResult<Option<(BucketValues, bool)>> {
    if fields.is_empty() {
        return Ok(None);
    }
    let mut complete = false;
    let mut parts: std::collections::BTreeMap<String, (String, String)> = Default::default();
    for (name, value) in fields {
        if name == "_s" {
            complete = value == "1";
        } else if let Some(field) = name.strip_prefix("u:") {
            parts.entry(field.to_owned()).or_default().0 = value;
        } else if let Some(field) = name.strip_prefix("n:") {
            parts.entry(field.to_owned()).or_default().1 = value;
        }
    }
    let mut values = Vec::with_capacity(parts.len());
    for (field, (units, nanos)) in parts {
        let field = FieldName::parse(&field).map_err(|err| corrupt(err.to_string()))?;
        let units = if units.is_empty() { "0".into() } else { units };
        let nanos = if nanos.is_empty() { "0".into() } else { nanos };
        values.push((field, amount_from_parts(&units, &nanos)?));
    }
    Ok(Some((
        BucketValues {
            bucket: bucket.clone(),
            values,
        },
        complete,
    )))
}

fn amount_from_parts(units: &str, nanos: &str) -> StoreResult<Amount> {
    let units: i128 = units
        .parse()
        .map_err(|_| corrupt(format!("bad counter units {units:?}")))?;
    let nanos: i64 = nanos
        .parse()
        .map_err(|_| corrupt(format!("bad counter nanos {nanos:?}")))?;
    Amount::from_parts(units, nanos).ok_or_else(|| corrupt("counter out of range".into()))
}

impl RedisStore {
    /// How long a bucket may go unused before Redis lets it go.
    fn bucket_idle(&self) -> Option<Duration> {
        (!self.counters_held).then_some(self.counter_idle)
    }
}

#[async_trait]
impl CacheCounters for RedisStore {
    #[tracing::instrument(level = "debug", skip_all, fields(scope = %increment.scope))]
    async fn increment(&self, increment: &CounterIncrement) -> StoreResult<CacheIncrementOutcome> {
        // Held here as the truth, an increment is journaled for no one.
        let payload = if self.counters_held {
            String::new()
        } else {
            serde_json::to_string(increment)
                .map_err(|err| StoreError::internal(Tier::Cache, err))?
        };
        let mut invocation = self.scripts.counter_increment.prepare_invoke();
        for bucket in &increment.buckets {
            invocation.key(self.keys.counter_bucket(&increment.scope, bucket));
        }
        invocation
            .key(self.keys.counter_journal_of(&increment.scope))
            .key(self.keys.counter_op(&increment.scope, &increment.op_id))
            .arg(increment.buckets.len())
            .arg(payload)
            .arg(increment.deltas.len());
        for (field, delta) in &increment.deltas {
            let (units, nanos) = delta.split();
            invocation
                .arg(field.as_str())
                .arg(units.to_string())
                .arg(nanos);
        }
        for bucket in &increment.buckets {
            invocation.arg(expiry_arg(bucket, self.bucket_idle()));
        }
        invocation.arg(ttl_millis(hybridstore_core::OP_ID_RETENTION));
        let reply: Vec<redis::Value> = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        let text = |value: &redis::Value| -> StoreResult<String> {
            redis::from_redis_value_ref(value).map_err(|err| corrupt(err.to_string()))
        };
        let mut reply = reply.iter();
        match reply.next().map(text).transpose()?.as_deref() {
            Some("dup") => Ok(CacheIncrementOutcome::Duplicate),
            Some("range") => Err(StoreError::CounterOutOfRange {
                field: reply.next().map(text).transpose()?.unwrap_or_default(),
            }),
            Some("cold") => {
                let mut cold = Vec::new();
                for index in reply {
                    let index: usize = redis::from_redis_value_ref(index)
                        .map_err(|err| corrupt(err.to_string()))?;
                    cold.push(increment.buckets[index - 1].clone());
                }
                Ok(CacheIncrementOutcome::Cold(cold))
            }
            Some("ok") => {
                let mut applied = Vec::with_capacity(increment.buckets.len());
                for bucket in &increment.buckets {
                    let complete = reply.next().map(text).transpose()?.as_deref() == Some("1");
                    let mut values = Vec::with_capacity(increment.deltas.len());
                    for (field, _) in &increment.deltas {
                        let units = reply.next().map(text).transpose()?.unwrap_or_default();
                        let nanos = reply.next().map(text).transpose()?.unwrap_or_default();
                        values.push((field.clone(), amount_from_parts(&units, &nanos)?));
                    }
                    applied.push((
                        BucketValues {
                            bucket: bucket.clone(),
                            values,
                        },
                        complete,
                    ));
                }
                Ok(CacheIncrementOutcome::Applied(applied))
            }
            other => Err(corrupt(format!("counter_increment answered {other:?}"))),
        }
    }

    async fn seed_ticket(&self, scope: &CounterScope) -> StoreResult<SeedTicket> {
        let drops: Option<u64> = redis::cmd("GET")
            .arg(self.keys.counter_drops_of(scope))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(SeedTicket(drops.unwrap_or(0)))
    }

    async fn seed_buckets(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        values: &[BucketValues],
        complete: bool,
        ticket: SeedTicket,
    ) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let drops = self.keys.counter_drops_of(scope);
        for bucket in buckets {
            let mut invocation = self
                .scripts
                .counter_seed
                .key(self.keys.counter_bucket(scope, bucket));
            invocation
                .key(&drops)
                .arg(if complete { "1" } else { "0" })
                .arg(expiry_arg(bucket, self.bucket_idle()))
                .arg(ticket.0.to_string());
            let held = values.iter().find(|v| {
                v.bucket.granularity == bucket.granularity && v.bucket.start == bucket.start
            });
            for (field, amount) in held.into_iter().flat_map(|v| &v.values) {
                let (units, nanos) = amount.split();
                invocation
                    .arg(field.as_str())
                    .arg(units.to_string())
                    .arg(nanos);
            }
            let installed: i64 = invocation.invoke_async(&mut conn).await.map_err(classify)?;
            if installed < 0 {
                // The rest would be refused too; the increment seeds again.
                return Ok(());
            }
        }
        Ok(())
    }

    async fn counter_buckets(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
    ) -> StoreResult<Vec<Option<(BucketValues, bool)>>> {
        if buckets.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for bucket in buckets {
            pipe.cmd("HGETALL")
                .arg(self.keys.counter_bucket(scope, bucket));
        }
        let hashes: Vec<Vec<(String, String)>> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        buckets
            .iter()
            .zip(hashes)
            .map(|(bucket, fields)| decode_bucket(bucket, fields))
            .collect()
    }

    async fn read_counter_journal(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> StoreResult<Vec<CounterJournalEntry>> {
        let streams = self.keys.counter_journals();
        let raw = match self.read_streams(consumer, &streams, max, recover).await {
            Err(err) if is_nogroup(&err) => {
                self.ensure_replay_groups().await?;
                self.read_streams(consumer, &streams, max, recover).await
            }
            result => result,
        }
        .map_err(classify)?;
        let mut entries = Vec::with_capacity(raw.len());
        for (index, id) in raw {
            let decoded = id
                .get::<String>("p")
                .ok_or_else(|| "no payload".to_owned())
                .and_then(|payload| {
                    serde_json::from_str::<CounterIncrement>(&payload).map_err(|e| e.to_string())
                });
            match decoded {
                Ok(increment) => entries.push(CounterJournalEntry {
                    position: JournalPosition {
                        journal: streams[index].clone(),
                        entry: id.id.clone(),
                        copy: String::new(),
                    },
                    increment,
                }),
                Err(err) => {
                    tracing::error!(error = %err, stream = %streams[index], id = %id.id, "undecodable counter journal entry left in place");
                }
            }
        }
        Ok(entries)
    }

    async fn ack_counter_journal(&self, positions: &[JournalPosition]) -> StoreResult<()> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for position in positions {
            pipe.cmd("XACK")
                .arg(&position.journal)
                .arg(REPLAY_GROUP)
                .arg(&position.entry)
                .ignore()
                .cmd("XDEL")
                .arg(&position.journal)
                .arg(&position.entry)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }

    async fn counter_backlog(&self) -> StoreResult<u64> {
        self.total_length(self.keys.counter_journals()).await
    }

    async fn pending_increments(
        &self,
        scope: &CounterScope,
        limit: usize,
    ) -> StoreResult<Option<Vec<CounterIncrement>>> {
        let stream = self.keys.counter_journal_of(scope);
        let mut conn = self.conn.clone();
        let length: usize = redis::cmd("XLEN")
            .arg(&stream)
            .query_async(&mut conn)
            .await
            .map_err(classify)?;
        if length > limit {
            return Ok(None);
        }
        let entries: Vec<StreamId> = {
            let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(&stream)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .map_err(classify)?;
            reply.ids
        };
        let mut pending = Vec::new();
        for entry in entries {
            let Some(payload) = entry.get::<String>("p") else {
                continue;
            };
            match serde_json::from_str::<CounterIncrement>(&payload) {
                Ok(increment) if &increment.scope == scope => pending.push(increment),
                Ok(_) => {}
                Err(err) => {
                    return Err(corrupt(format!(
                        "counter journal entry {}: {err}",
                        entry.id
                    )));
                }
            }
        }
        Ok(Some(pending))
    }

    async fn forget_buckets(&self, scope: &CounterScope, buckets: &[Bucket]) -> StoreResult<()> {
        if buckets.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = buckets
            .iter()
            .map(|bucket| self.keys.counter_bucket(scope, bucket))
            .collect();
        // Counted and dropped in one step: a seed read before cannot land
        // between the two.
        redis::pipe()
            .atomic()
            .cmd("INCR")
            .arg(self.keys.counter_drops_of(scope))
            .ignore()
            .cmd("UNLINK")
            .arg(keys)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }

    async fn scan_buckets(
        &self,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<(CounterScope, BucketValues)>)> {
        let mut conn = self.conn.clone();
        let (next, keys) =
            scan_step(&mut conn, cursor, &self.keys.counter_pattern(), count).await?;
        let named: Vec<(String, (CounterScope, Bucket))> = keys
            .into_iter()
            .filter_map(|key| {
                let (scope, granularity, start) = self.keys.parse_counter_bucket(&key)?;
                let bucket = Bucket {
                    granularity,
                    start,
                    expires_at: None,
                };
                Some((key, (scope, bucket)))
            })
            .collect();
        if named.is_empty() {
            return Ok((next, Vec::new()));
        }
        let mut pipe = redis::pipe();
        for (key, _) in &named {
            pipe.cmd("HGETALL").arg(key);
        }
        let held: Vec<Vec<(String, String)>> =
            pipe.query_async(&mut conn).await.map_err(classify)?;
        let mut buckets = Vec::with_capacity(named.len());
        for ((_, (scope, bucket)), fields) in named.into_iter().zip(held) {
            // Gone between the scan and the read (it expired): left out.
            if let Some((values, _)) = decode_bucket(&bucket, fields)? {
                buckets.push((scope, values));
            }
        }
        Ok((next, buckets))
    }

    async fn restore_buckets(
        &self,
        values: &[CounterValue],
        force: bool,
    ) -> StoreResult<Vec<bool>> {
        let mut conn = self.conn.clone();
        let mut written = Vec::with_capacity(values.len());
        for value in values {
            let bucket = Bucket {
                granularity: value.granularity,
                start: value.bucket_start,
                expires_at: value.expires_at,
            };
            let (units, nanos) = value.value.split();
            let done: i64 = self
                .scripts
                .counter_restore
                .key(self.keys.counter_bucket(&value.scope, &bucket))
                .arg(value.field.as_str())
                .arg(units.to_string())
                .arg(nanos)
                .arg(if force { "1" } else { "0" })
                .arg(expiry_arg(&bucket, self.bucket_idle()))
                .invoke_async(&mut conn)
                .await
                .map_err(classify)?;
            written.push(done == 1);
        }
        Ok(written)
    }

    async fn forget_counters(&self) -> StoreResult<u64> {
        let mut conn = self.conn.clone();
        // Counted before the scan: a seed read before lands either before
        // the scan (which then removes it) or after the count (refused).
        let mut counted = redis::pipe();
        for shard in 0..SHARDS {
            counted
                .cmd("INCR")
                .arg(self.keys.counter_drops(shard))
                .ignore();
        }
        counted
            .query_async::<()>(&mut conn)
            .await
            .map_err(classify)?;
        let pattern = self.keys.counter_pattern();
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys) = scan_step(&mut conn, cursor, &pattern, 1000).await?;
            if !keys.is_empty() {
                removed += keys.len() as u64;
                redis::cmd("UNLINK")
                    .arg(keys)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(classify)?;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}
