//! Redis key layout.
//!
//! Every key carries a hash tag `{N}` naming one of [`SHARDS`] shards, derived
//! from what the key is about. Keys that a single script must touch together
//! (a record and its journal entry, for write-behind) are put in the same shard,
//! so every multi-key script stays within one hash slot and works unchanged on
//! Redis Cluster. The per-deployment prefix keeps several services (or tests)
//! apart on one Redis.
//!
//! ```text
//! {prefix}:{N}:r:{collection}:{id}               record copy (hash: v, d)
//! {prefix}:{N}:i:{collection}:{index}:{value}    unique-index hint -> id
//! {prefix}:{N}:journal                           write-behind (cache_first) not yet replayed
//! {prefix}:{N}:outage                            writes taken while the durable tier was down
//! {prefix}:{N}:ids:{collection}                  ids of a cache-only collection (zset)
//! {prefix}:{N}:c:{scope}:{bucket}                counter bucket (hash), N from the scope
//! {prefix}:{N}:counters                          increments not yet replayed (stream)
//! {prefix}:{N}:cdrops                            counter buckets dropped so far (seed tickets)
//! {prefix}:control                               mirror of the operators' run-time state
//! {prefix}:control:changes                       pub/sub channel of its changes
//! ```

use hybridstore_core::{
    Bucket, CollectionName, CounterScope, Granularity, IndexName, JournalKind, RecordId, RecordKey,
};
use time::OffsetDateTime;

/// Number of hash-tag shards. Changing it moves every key (a cold cache).
pub const SHARDS: u64 = 16;

#[derive(Clone, Debug)]
pub struct KeySpace {
    prefix: String,
}

/// FNV-1a: stable across processes and versions (unlike std's SipHash keys).
fn shard_of(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash % SHARDS
}

impl KeySpace {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key holding the cached copy of a record.
    pub fn record(&self, key: &RecordKey) -> String {
        let (collection, id) = (key.collection.as_str(), key.id.as_str());
        let shard = shard_of(&[collection, id]);
        format!("{}:{{{shard}}}:r:{collection}:{id}", self.prefix)
    }

    /// Whether `key` (of this key space) holds a copy that invalidation may
    /// remove: a record copy or a lookup hint.
    pub fn is_copy(&self, key: &str) -> bool {
        let Some(rest) = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix(":{"))
        else {
            return false;
        };
        let Some((_, kind)) = rest.split_once("}:") else {
            return false;
        };
        kind.starts_with("r:") || kind.starts_with("i:")
    }

    /// The journal stream of the shard `record_key` (from [`Self::record`])
    /// belongs to: same hash tag, so one script can touch both.
    pub fn journal_of(&self, key: &RecordKey, kind: JournalKind) -> String {
        let shard = shard_of(&[key.collection.as_str(), key.id.as_str()]);
        self.journal(shard, kind)
    }

    /// The journal stream of one shard.
    pub fn journal(&self, shard: u64, kind: JournalKind) -> String {
        let name = match kind {
            JournalKind::WriteBehind => "journal",
            JournalKind::Outage => "outage",
        };
        format!("{}:{{{shard}}}:{name}", self.prefix)
    }

    /// The ids of `key`'s collection with a pinned copy in `key`'s shard
    /// (journaled, not yet replayed), for listing what the durable tier
    /// still lacks.
    pub fn pinned_of(&self, key: &RecordKey) -> String {
        let shard = shard_of(&[key.collection.as_str(), key.id.as_str()]);
        self.pinned(shard, &key.collection)
    }

    pub fn pinned(&self, shard: u64, collection: &CollectionName) -> String {
        format!("{}:{{{shard}}}:pinned:{collection}", self.prefix)
    }

    /// The durable cache generation this cache was last reconciled to.
    pub fn reconciled_generation(&self) -> String {
        format!("{}:reconciled", self.prefix)
    }

    /// The dead-letter journal of the shard of `key`: entries the durable
    /// tier refused (same hash tag as the record and its journal).
    pub fn dead_letters_of(&self, key: &RecordKey) -> String {
        let shard = shard_of(&[key.collection.as_str(), key.id.as_str()]);
        self.dead_letters(shard)
    }

    pub fn dead_letters(&self, shard: u64) -> String {
        format!("{}:{{{shard}}}:dead", self.prefix)
    }

    /// Every shard's dead-letter journal.
    pub fn all_dead_letters(&self) -> Vec<String> {
        (0..SHARDS).map(|shard| self.dead_letters(shard)).collect()
    }

    /// The ids of a cache-only collection held in the shard of `key`, for
    /// listing (same hash tag as the record).
    pub fn ids_of(&self, key: &RecordKey) -> String {
        let shard = shard_of(&[key.collection.as_str(), key.id.as_str()]);
        self.ids(shard, &key.collection)
    }

    /// The id set of a cache-only collection in one shard.
    pub fn ids(&self, shard: u64, collection: &CollectionName) -> String {
        format!("{}:{{{shard}}}:ids:{collection}", self.prefix)
    }

    /// Every journal stream of one kind.
    pub fn journals(&self, kind: JournalKind) -> Vec<String> {
        (0..SHARDS).map(|shard| self.journal(shard, kind)).collect()
    }

    /// A `SCAN MATCH` pattern for the record keys of one collection.
    pub fn record_pattern(&self, collection: &CollectionName) -> String {
        format!(
            "{}:{{*}}:r:{}:*",
            glob_escape(&self.prefix),
            glob_escape(collection.as_str())
        )
    }

    /// The record id in a key of [`Self::record_pattern`].
    pub fn record_id<'k>(&self, key: &'k str, collection: &CollectionName) -> Option<&'k str> {
        let rest = key.strip_prefix(self.prefix.as_str())?.strip_prefix(":{")?;
        let (_, rest) = rest.split_once("}:r:")?;
        rest.strip_prefix(collection.as_str())?.strip_prefix(':')
    }

    /// The hash holding one bucket of a counter scope (`u:<field>` whole
    /// units, `n:<field>` nano remainder, `_s` complete flag). Sharded by
    /// scope: one script updates all of a scope's buckets and its journal.
    pub fn counter_bucket(&self, scope: &CounterScope, bucket: &Bucket) -> String {
        let shard = shard_of(&[scope.as_str()]);
        format!(
            "{}:{{{shard}}}:c:{scope}:{}",
            self.prefix,
            bucket.granularity.label(bucket.start)
        )
    }

    /// The marker of an applied increment id (in its scope's shard).
    pub fn counter_op(&self, scope: &CounterScope, op_id: &str) -> String {
        let shard = shard_of(&[scope.as_str()]);
        format!("{}:{{{shard}}}:op:{op_id}", self.prefix)
    }

    /// An idempotency key's record (`key` is already a digest), in its
    /// caller's shard, beside the caller's ledger of stored responses.
    pub fn idempotency(&self, owner: &str, key: &str) -> String {
        let shard = shard_of(&[owner]);
        format!("{}:{{{shard}}}:idem:{key}", self.prefix)
    }

    /// The ledger of a caller's stored responses (a sorted set by expiry)
    /// and their sizes (a hash).
    pub fn replay_ledger(&self, owner: &str) -> (String, String) {
        let shard = shard_of(&[owner]);
        (
            format!("{}:{{{shard}}}:idem-ledger:{owner}", self.prefix),
            format!("{}:{{{shard}}}:idem-sizes:{owner}", self.prefix),
        )
    }

    /// The ledger of every caller's stored responses, and their sizes.
    pub fn replay_ledger_all(&self) -> (String, String) {
        (
            format!("{}:{{all}}:idem-ledger", self.prefix),
            format!("{}:{{all}}:idem-sizes", self.prefix),
        )
    }

    /// The id of the record of `collection` whose key is `key` (a claim
    /// holds its owner's record key); `None` for any other text.
    pub fn record_id_in(&self, collection: &CollectionName, key: &str) -> Option<RecordId> {
        let rest = key.strip_prefix(self.prefix.as_str())?.strip_prefix(":{")?;
        let (_shard, rest) = rest.split_once("}:r:")?;
        let id = rest.strip_prefix(collection.as_str())?.strip_prefix(':')?;
        RecordId::parse(id).ok()
    }

    /// The scope and bucket a counter bucket key names (see
    /// [`KeySpace::counter_bucket`]); `None` for any other key.
    pub fn parse_counter_bucket(
        &self,
        key: &str,
    ) -> Option<(CounterScope, Granularity, OffsetDateTime)> {
        let rest = key.strip_prefix(self.prefix.as_str())?.strip_prefix(":{")?;
        let (_shard, rest) = rest.split_once("}:c:")?;
        let (scope, label) = rest.rsplit_once(':')?;
        let scope = CounterScope::parse(scope).ok()?;
        let (granularity, start) = Granularity::parse_label(label)?;
        Some((scope, granularity, start))
    }

    /// A `SCAN MATCH` pattern for every counter bucket.
    pub fn counter_pattern(&self) -> String {
        format!("{}:{{*}}:c:*", glob_escape(&self.prefix))
    }

    /// The counter journal of the shard of `scope`.
    pub fn counter_journal_of(&self, scope: &CounterScope) -> String {
        self.counter_journal(shard_of(&[scope.as_str()]))
    }

    pub fn counter_journal(&self, shard: u64) -> String {
        format!("{}:{{{shard}}}:counters", self.prefix)
    }

    /// How many times counter buckets of the scopes of `scope`'s shard were
    /// dropped: a seed installs only while it is what the seeder read first.
    pub fn counter_drops_of(&self, scope: &CounterScope) -> String {
        self.counter_drops(shard_of(&[scope.as_str()]))
    }

    pub fn counter_drops(&self, shard: u64) -> String {
        format!("{}:{{{shard}}}:cdrops", self.prefix)
    }

    /// Every counter journal stream.
    pub fn counter_journals(&self) -> Vec<String> {
        (0..SHARDS)
            .map(|shard| self.counter_journal(shard))
            .collect()
    }

    /// The mirror of the control state.
    pub fn control(&self) -> String {
        format!("{}:control", self.prefix)
    }

    /// The channel control changes are broadcast on.
    pub fn control_channel(&self) -> String {
        format!("{}:control:changes", self.prefix)
    }

    /// The key holding the id a unique index value was last seen pointing to.
    pub fn lookup_hint(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
    ) -> String {
        let (collection, index) = (collection.as_str(), index.as_str());
        let shard = shard_of(&[collection, index, value]);
        format!("{}:{{{shard}}}:i:{collection}:{index}:{value}", self.prefix)
    }
}

/// Escapes the glob characters of `SCAN MATCH` patterns.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_carry_one_stable_hash_tag() {
        let keys = KeySpace::new("hs");
        let key = RecordKey::new(
            CollectionName::parse("api_keys").unwrap(),
            RecordId::parse("k1").unwrap(),
        );
        let redis_key = keys.record(&key);
        assert_eq!(redis_key, keys.record(&key));
        let tag = &redis_key[redis_key.find('{').unwrap()..=redis_key.find('}').unwrap()];
        let shard: u64 = tag.trim_matches(|c| c == '{' || c == '}').parse().unwrap();
        assert!(shard < SHARDS);
        assert!(redis_key.starts_with("hs:{") && redis_key.ends_with(":r:api_keys:k1"));
    }

    #[test]
    fn record_keys_give_back_their_id() {
        let keys = KeySpace::new("hs:a");
        let users = CollectionName::parse("users").unwrap();
        let key = RecordKey::new(users.clone(), RecordId::parse("u:1").unwrap());
        let id = keys.record_id_in(&users, &keys.record(&key));
        assert_eq!(id.as_ref().map(RecordId::as_str), Some("u:1"));
        let groups = CollectionName::parse("groups").unwrap();
        assert_eq!(keys.record_id_in(&groups, &keys.record(&key)), None);
        assert_eq!(
            KeySpace::new("hs").record_id_in(&users, &keys.record(&key)),
            None
        );
        assert_eq!(keys.record_id_in(&users, "u:1"), None, "a bare id");
    }

    #[test]
    fn counter_bucket_keys_parse_back_to_their_scope_and_bucket() {
        let keys = KeySpace::new("hs:a");
        let scope = CounterScope::parse("usage:key:1").unwrap();
        let at = time::macros::datetime!(2026-11-22 05:42 UTC);
        for granularity in Granularity::ALL {
            let bucket = Bucket {
                granularity,
                start: granularity.bucket_start(at),
                expires_at: None,
            };
            let key = keys.counter_bucket(&scope, &bucket);
            assert_eq!(
                keys.parse_counter_bucket(&key),
                Some((scope.clone(), granularity, bucket.start)),
                "{key}"
            );
            assert_eq!(
                KeySpace::new("hs").parse_counter_bucket(&key),
                None,
                "another prefix"
            );
        }
        assert_eq!(keys.parse_counter_bucket("hs:a:{3}:cdrops"), None);
        assert_eq!(keys.parse_counter_bucket("hs:a:{3}:r:users:u1"), None);
    }

    #[test]
    fn copies_are_recognised_by_kind() {
        let keys = KeySpace::new("hs");
        let record = keys.record(&RecordKey::new(
            CollectionName::parse("users").unwrap(),
            RecordId::parse("u1").unwrap(),
        ));
        assert!(keys.is_copy(&record));
        assert!(keys.is_copy("hs:{3}:i:users:username:ada"));
        assert!(!keys.is_copy("hs:{3}:journal"));
        let user = RecordKey::new(
            CollectionName::parse("users").unwrap(),
            RecordId::parse("u1").unwrap(),
        );
        let journal = keys.journal_of(&user, JournalKind::Outage);
        assert!(!keys.is_copy(&journal));
        assert!(!keys.is_copy(&keys.journal_of(&user, JournalKind::WriteBehind)));
        let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_owned();
        assert_eq!(
            tag(&journal),
            tag(&record),
            "record and journal share a slot"
        );
        assert!(!keys.is_copy("hsx:{3}:r:users:u1"), "another prefix");
    }

    #[test]
    fn record_scans_match_one_collection() {
        let keys = KeySpace::new("hs[1]");
        let users = CollectionName::parse("users").unwrap();
        assert_eq!(keys.record_pattern(&users), "hs\\[1\\]:{*}:r:users:*");
        let key = keys.record(&RecordKey::new(
            users.clone(),
            RecordId::parse("a:b").unwrap(),
        ));
        assert_eq!(keys.record_id(&key, &users), Some("a:b"));
        let other = CollectionName::parse("users2").unwrap();
        assert_eq!(keys.record_id(&key, &other), None);
    }

    #[test]
    fn shards_spread() {
        let shards: std::collections::HashSet<u64> = (0..200)
            .map(|i| shard_of(&["users", &format!("u{i}")]))
            .collect();
        assert_eq!(shards.len() as u64, SHARDS);
    }
}
