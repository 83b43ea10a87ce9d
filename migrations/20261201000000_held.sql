-- Keys whose newest version waits in a cache journal, published by the
-- instance that journaled them. While the cache is unreachable no instance
-- can read another's journal; every instance serving from this table's
-- database then answers 503 for a key held here above the version `records`
-- stores, instead of an older version (SPEC section 5, several instances).
-- Rows are released once `records` has caught up, or after a minute with
-- the journals empty (their entries were set aside).
CREATE TABLE held (
    collection text        NOT NULL,
    id         text        COLLATE "C" NOT NULL,
    version    bigint      NOT NULL,
    held_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection, id)
);
