-- The size of each record's data, kept by the server itself: list pages are
-- bounded in bytes by their query, which sums this column, without reading
-- the rows it leaves out. (Adding a stored generated column rewrites the
-- table once.)
ALTER TABLE records
    ADD COLUMN data_bytes integer GENERATED ALWAYS AS (octet_length(data::text)) STORED;
