-- Records: the source of truth for every collection.
--
-- A deleted record stays as a tombstone row (deleted = true) for a while so that
-- a re-created record continues the version sequence; the purge task removes
-- tombstones and expired rows later. Ids use the "C" collation so that keyset
-- pagination orders by bytes, independent of the server's locale.
CREATE TABLE records (
    collection      text        NOT NULL,
    id              text        COLLATE "C" NOT NULL,
    version         bigint      NOT NULL,
    -- version at which the current incarnation was created: a write is a
    -- creation exactly when it returns version = created_version
    created_version bigint      NOT NULL,
    data            jsonb       NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    expires_at      timestamptz,
    deleted         boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (collection, id)
);

CREATE INDEX records_expiring ON records (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX records_tombstones ON records (updated_at) WHERE deleted;

-- Unique index entries: one row per (collection, index, value). The primary key
-- is what makes uniqueness atomic across concurrent writers. An entry whose
-- record is deleted or expired is dead and may be taken over by another record.
CREATE TABLE record_index (
    collection text NOT NULL,
    index_name text NOT NULL,
    value      text NOT NULL,
    record_id  text COLLATE "C" NOT NULL,
    PRIMARY KEY (collection, index_name, value),
    FOREIGN KEY (collection, record_id) REFERENCES records (collection, id) ON DELETE CASCADE
);

CREATE INDEX record_index_by_record ON record_index (collection, record_id);
