-- The embedded durable tier: the same tables as PostgreSQL, in SQLite.
--
-- Times are microseconds since the Unix epoch (PostgreSQL's precision), so a
-- record exported from one tier and imported into the other compares equal.
-- Counter values are exact nano-unit integers kept as text (they may exceed
-- 64 bits). Text compares byte-wise (BINARY collation), so keyset pagination
-- orders ids exactly like PostgreSQL's "C" collation.

CREATE TABLE records (
    collection      TEXT    NOT NULL,
    id              TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    created_version INTEGER NOT NULL,
    data            TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    expires_at      INTEGER,
    deleted         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (collection, id)
) WITHOUT ROWID;

CREATE INDEX records_expiring ON records (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX records_tombstones ON records (updated_at) WHERE deleted;

CREATE TABLE record_index (
    collection TEXT NOT NULL,
    index_name TEXT NOT NULL,
    value      TEXT NOT NULL,
    record_id  TEXT NOT NULL,
    PRIMARY KEY (collection, index_name, value),
    FOREIGN KEY (collection, record_id) REFERENCES records (collection, id) ON DELETE CASCADE
) WITHOUT ROWID;

CREATE INDEX record_index_by_record ON record_index (collection, record_id);

CREATE TABLE control (
    name       TEXT    PRIMARY KEY,
    revision   INTEGER NOT NULL,
    value      TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE counters (
    scope        TEXT    NOT NULL,
    granularity  TEXT    NOT NULL,
    bucket_start INTEGER NOT NULL,
    field        TEXT    NOT NULL,
    nanos        TEXT    NOT NULL,
    expires_at   INTEGER,
    PRIMARY KEY (scope, granularity, bucket_start, field)
) WITHOUT ROWID;

CREATE INDEX counters_expiring ON counters (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE counter_ops (
    op_id      TEXT    PRIMARY KEY,
    applied_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX counter_ops_applied ON counter_ops (applied_at);
