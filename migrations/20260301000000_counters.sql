-- Usage counters: one row per (scope, bucket, field), exact decimals.
-- `total` buckets start at the epoch and never expire; the purge task removes
-- rows past `expires_at` (the bucket's end plus its retention).
CREATE TABLE counters (
    scope        text COLLATE "C" NOT NULL,
    granularity  text        NOT NULL,
    bucket_start timestamptz NOT NULL,
    field        text        NOT NULL,
    value        numeric(40, 9) NOT NULL,
    expires_at   timestamptz,
    PRIMARY KEY (scope, granularity, bucket_start, field)
);

CREATE INDEX counters_expiring ON counters (expires_at) WHERE expires_at IS NOT NULL;

-- Increments already applied, by their id: a journal entry replayed twice, or
-- a retried direct write, is applied once. Kept two days (journal entries are
-- replayed within seconds).
CREATE TABLE counter_ops (
    op_id      text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX counter_ops_applied ON counter_ops (applied_at);
