//! Writes taken ahead of the durable tier, their replay and the dead letters.

use super::*;

/// A journal entry as the write script appended it.
fn decode_journal_entry(
    kind: JournalKind,
    stream: &str,
    entry: &StreamId,
) -> StoreResult<JournalEntry> {
    let text = |field: &str| -> StoreResult<String> {
        entry
            .get::<String>(field)
            .ok_or_else(|| corrupt(format!("journal entry {} without {field}", entry.id)))
    };
    let number = |field: &str| -> StoreResult<i64> {
        text(field)?
            .parse()
            .map_err(|err| corrupt(format!("journal entry {}: {field}: {err}", entry.id)))
    };
    let collection =
        CollectionName::parse(&text("collection")?).map_err(|err| corrupt(err.to_string()))?;
    let id = RecordId::parse(&text("id")?).map_err(|err| corrupt(err.to_string()))?;
    let key = RecordKey::new(collection, id);
    let version = parse_version(&text("v")?)?;
    let updated_at = Micros::new(number("u")?).time(Tier::Cache)?;
    let change = match text("op")?.as_str() {
        "put" => {
            let expires = text("x")?;
            Change::Put(Record {
                collection: key.collection,
                id: key.id,
                version,
                data: parse_data(text("d")?.as_bytes())?,
                created_at: Micros::new(number("c")?).time(Tier::Cache)?,
                updated_at,
                expires_at: match expires.as_str() {
                    "" => None,
                    micros => Some(
                        Micros::new(micros.parse().map_err(|_| corrupt("bad expiry".into()))?)
                            .time(Tier::Cache)?,
                    ),
                },
            })
        }
        "delete" => Change::Delete {
            key,
            version,
            at: updated_at,
        },
        other => {
            return Err(corrupt(format!(
                "journal entry {}: unknown op {other:?}",
                entry.id
            )));
        }
    };
    Ok(JournalEntry {
        kind,
        position: JournalPosition {
            journal: stream.to_owned(),
            entry: entry.id.clone(),
            copy: text("key")?,
        },
        change,
    })
}

#[async_trait]
impl CacheJournal for RedisStore {
    #[tracing::instrument(level = "debug", skip_all, fields(collection = %write.key.collection, id = %write.key.id))]
    async fn accept_write(&self, write: &CacheWrite) -> StoreResult<CacheWriteOutcome> {
        let (op, data, expires) = match &write.change {
            WriteChange::Put { data, expires_at } => (
                "put",
                serde_json::to_string(data)
                    .map_err(|err| StoreError::internal(Tier::Cache, err))?,
                expires_at
                    .map(|at| Micros::of(at).get())
                    .map(|x| x.to_string())
                    .unwrap_or_default(),
            ),
            WriteChange::Delete => ("delete", String::new(), String::new()),
        };
        let (precondition, expected) = match write.precondition {
            Precondition::None => ("none", String::new()),
            Precondition::IfMatch(version) => ("match", version.to_padded()),
            Precondition::Exists => ("exists", String::new()),
            Precondition::Absent => ("absent", String::new()),
        };
        let (mode, second) = match write.journal {
            Some(kind) => ("journal", self.keys.journal_of(&write.key, kind)),
            None => ("only", self.keys.ids_of(&write.key)),
        };
        let mut invocation = self.scripts.accept_write.key(self.keys.record(&write.key));
        invocation.key(second).key(self.keys.pinned_of(&write.key));
        for claim in &write.claims {
            invocation.key(self.keys.lookup_hint(
                &write.key.collection,
                &claim.index,
                &claim.value,
            ));
        }
        invocation
            .arg(op)
            .arg(Version::next(None, write.now).to_padded())
            .arg(precondition)
            .arg(expected)
            .arg(data)
            .arg(Micros::of(write.now).get())
            .arg(expires)
            .arg(if write.unknown_state_ok { "1" } else { "0" })
            .arg(write.key.collection.as_str())
            .arg(write.key.id.as_str())
            .arg(mode)
            .arg(ttl_millis(write.deleted_marker_ttl));
        for claim in &write.claims {
            invocation.arg(claim.index.as_str()).arg(&claim.value);
        }
        let reply: Vec<String> = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        let field = |i: usize| reply.get(i).map(String::as_str).unwrap_or("");
        match field(0) {
            "ok" => Ok(CacheWriteOutcome::Written {
                version: parse_version(field(1))?,
                created: field(2) == "1",
                created_at: Micros::new(
                    field(3)
                        .parse()
                        .map_err(|_| corrupt("bad created_at".into()))?,
                )
                .time(Tier::Cache)?,
            }),
            "unknown" => Ok(CacheWriteOutcome::UnknownState),
            "conflict" => Ok(CacheWriteOutcome::Conflict {
                current: match field(1) {
                    "" => None,
                    version => Some(parse_version(version)?),
                },
            }),
            "notfound" => Ok(CacheWriteOutcome::NotFound),
            "taken" => Err(StoreError::UniqueViolation {
                index: field(1).to_owned(),
                value: field(2).to_owned(),
            }),
            other => Err(corrupt(format!(
                "unexpected reply from the write script: {other:?}"
            ))),
        }
    }

    async fn read_journal(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> StoreResult<Vec<JournalEntry>> {
        match self.read_journal_once(consumer, max, recover).await {
            // The groups vanish with a Redis that restarted empty: recreate.
            Err(err) if is_nogroup(&err) => {
                self.ensure_replay_groups().await?;
                self.read_journal_once(consumer, max, recover)
                    .await
                    .map_err(classify)
            }
            result => result.map_err(classify),
        }
    }

    async fn ack_journal(&self, acks: &[JournalAck]) -> StoreResult<()> {
        // One script call per entry (unpin, XACK, XDEL in one step), all
        // sent at once: the multiplexed connection pipelines them.
        for chunk in acks.chunks(1000) {
            let calls = chunk.iter().map(|ack| {
                let mut conn = self.conn.clone();
                let mut invocation = self.scripts.ack.key(&ack.position.copy);
                invocation
                    .key(self.keys.pinned_of(&ack.key))
                    .key(&ack.position.journal)
                    .arg(ack.version.to_padded())
                    .arg(ttl_millis(ack.ttl))
                    .arg(if ack.superseded { "1" } else { "0" })
                    .arg(ack.key.id.as_str())
                    .arg(REPLAY_GROUP)
                    .arg(&ack.position.entry);
                async move { invocation.invoke_async::<i64>(&mut conn).await }
            });
            for acked in futures_util::future::join_all(calls).await {
                acked.map_err(classify)?;
            }
        }
        Ok(())
    }

    async fn set_aside(&self, refused: &[(JournalEntry, String)]) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        for (entry, reason) in refused {
            let key = entry.change.key();
            let (op, data) = match &entry.change {
                Change::Put(record) => (
                    "put",
                    serde_json::to_string(&record.data)
                        .map_err(|err| StoreError::internal(Tier::Cache, err))?,
                ),
                Change::Delete { .. } => ("delete", String::new()),
            };
            // Kept first, dropped from the journal after: a failure in
            // between sets it aside twice rather than losing it.
            redis::cmd("XADD")
                .arg(self.keys.dead_letters_of(&key))
                .arg("MAXLEN")
                .arg("~")
                .arg(MAX_DEAD_LETTERS)
                .arg("*")
                .arg(&[
                    ("collection", key.collection.as_str()),
                    ("id", key.id.as_str()),
                    ("op", op),
                    ("v", &entry.change.version().to_padded()),
                    ("d", &data),
                    ("reason", reason),
                    ("journal", &entry.position.journal),
                ])
                .query_async::<()>(&mut conn)
                .await
                .map_err(classify)?;
            self.ack_journal(&[JournalAck::set_aside(entry)]).await?;
        }
        Ok(())
    }

    async fn dead_letters(&self) -> StoreResult<u64> {
        self.total_length(self.keys.all_dead_letters()).await
    }

    async fn pinned(&self, query: &ListQuery) -> StoreResult<Vec<Change>> {
        let keys = self
            .ids_in_range(query, |shard| self.keys.pinned(shard, &query.collection))
            .await?;
        let mut pinned: Vec<Change> = self
            .get_states(&keys)
            .await?
            .into_iter()
            .flatten()
            .filter(|held| held.pinned)
            .map(|held| held.state)
            .collect();
        pinned.truncate(query.limit as usize);
        Ok(pinned)
    }

    async fn journal_backlog(&self, kind: JournalKind) -> StoreResult<u64> {
        let mut pipe = redis::pipe();
        for stream in self.keys.journals(kind) {
            pipe.cmd("XLEN").arg(stream);
        }
        let lengths: Vec<u64> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(lengths.iter().sum())
    }
}

impl RedisStore {
    async fn read_journal_once(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> Result<Vec<JournalEntry>, RedisError> {
        // Outage writes first: their backlog holds the configured strategy back.
        let (kinds, streams): (Vec<JournalKind>, Vec<String>) =
            [JournalKind::Outage, JournalKind::WriteBehind]
                .into_iter()
                .flat_map(|kind| {
                    self.keys
                        .journals(kind)
                        .into_iter()
                        .map(move |stream| (kind, stream))
                })
                .unzip();
        let raw: Vec<(JournalKind, &String, StreamId)> = self
            .read_streams(consumer, &streams, max, recover)
            .await?
            .into_iter()
            .map(|(index, id)| (kinds[index], &streams[index], id))
            .collect();
        let mut entries = Vec::with_capacity(raw.len());
        for (kind, stream, id) in &raw {
            match decode_journal_entry(*kind, stream, id) {
                Ok(entry) => entries.push(entry),
                Err(err) => {
                    // Never drop an entry silently; it stays pending and shows
                    // in the backlog.
                    tracing::error!(error = %err, stream, id = %id.id, "undecodable journal entry left in place");
                }
            }
        }
        Ok(entries)
    }
}
