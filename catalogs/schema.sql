-- fsr-pipe catalog schema, version 1. Applied idempotently by pipeline/catalog.py.
-- Bulk data lives in Parquet artifacts; these tables hold what was planned, run and written.
-- Docs: docs/catalog.md.

CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER NOT NULL,
    applied_at  TIMESTAMP NOT NULL
);

-- The current plan of each stage: the fingerprint its units were planned under.
CREATE TABLE IF NOT EXISTS stages (
    stage        VARCHAR NOT NULL,
    fingerprint  VARCHAR NOT NULL,
    code_version VARCHAR NOT NULL,
    config_json  VARCHAR NOT NULL,   -- the stage's config section, as fingerprinted
    inputs_json  VARCHAR NOT NULL,   -- upstream stage -> fingerprint
    notes        VARCHAR,            -- e.g. "VGG weights: seeded random init"
    planned_at   TIMESTAMP NOT NULL
);
-- The stage's place in the pipeline (stage_summary's order); added after schema v1 shipped.
ALTER TABLE stages ADD COLUMN IF NOT EXISTS position INTEGER;

-- Every planned unit of work. A (stage, unit_key, fingerprint) row is planned once and never
-- re-planned; rows of older fingerprints stay as history and count as stale.
CREATE TABLE IF NOT EXISTS units (
    stage        VARCHAR NOT NULL,
    unit_key     VARCHAR NOT NULL,   -- zero-padded, e.g. shard-00003
    fingerprint  VARCHAR NOT NULL,
    status       VARCHAR NOT NULL,   -- pending | running | done | failed
    params_json  VARCHAR NOT NULL,   -- what the unit covers, frozen at planning
    attempts     INTEGER NOT NULL DEFAULT 0,
    host         VARCHAR,
    pid          INTEGER,
    started_at   TIMESTAMP,
    finished_at  TIMESTAMP,
    seconds      DOUBLE,
    rows         BIGINT,             -- items the unit produced
    error        VARCHAR
);

-- Files a unit wrote. Only rows of units that finished exist: the row is written last.
CREATE TABLE IF NOT EXISTS artifacts (
    stage        VARCHAR NOT NULL,
    unit_key     VARCHAR NOT NULL,
    fingerprint  VARCHAR NOT NULL,
    kind         VARCHAR NOT NULL,   -- e.g. gram_queries, centres
    path         VARCHAR NOT NULL,   -- absolute
    rows         BIGINT,
    bytes        BIGINT NOT NULL,
    sha256       VARCHAR NOT NULL,
    created_at   TIMESTAMP NOT NULL
);

-- Bad inputs: recorded and skipped, never fatal below data.max_failure_ratio.
CREATE TABLE IF NOT EXISTS item_failures (
    stage        VARCHAR NOT NULL,
    unit_key     VARCHAR NOT NULL,
    fingerprint  VARCHAR NOT NULL,
    item_kind    VARCHAR NOT NULL,   -- gallery | query
    item_id      BIGINT,
    path         VARCHAR,
    reason       VARCHAR NOT NULL,
    recorded_at  TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS metrics (
    stage        VARCHAR NOT NULL,
    unit_key     VARCHAR NOT NULL,
    fingerprint  VARCHAR NOT NULL,
    name         VARCHAR NOT NULL,
    value        DOUBLE,
    labels_json  VARCHAR,            -- e.g. {"style": "sketch"}
    recorded_at  TIMESTAMP NOT NULL
);
