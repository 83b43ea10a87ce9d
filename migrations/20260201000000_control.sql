-- The operators' run-time state (strategy switches, cache generation), one
-- JSON document per name. `revision` orders changes: a save only replaces an
-- older revision, so two concurrent switches cannot silently overwrite each
-- other.
CREATE TABLE control (
    name       text        PRIMARY KEY,
    revision   bigint      NOT NULL,
    value      jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
