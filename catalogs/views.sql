-- Named views over the catalog tables (recreated on every catalog open).
-- Views over Parquet artifacts (gallery, queries, gram_features, ...) are created by the
-- stages that write them: see docs/catalog.md.

-- Units of each stage's current plan.
CREATE OR REPLACE VIEW current_units AS
SELECT u.*
FROM units u JOIN stages s ON u.stage = s.stage AND u.fingerprint = s.fingerprint;

-- One row per stage: progress of the current plan as far as the driver has ingested unit
-- records, in pipeline order (each plan records its stage's position). Running and lost units
-- live in lease files: `fsr-pipe status` shows them.
CREATE OR REPLACE VIEW stage_summary AS
SELECT
    s.stage,
    s.fingerprint,
    count(u.unit_key) FILTER (WHERE u.status = 'done')    AS done,
    count(u.unit_key) FILTER (WHERE u.status = 'pending') AS pending,
    count(u.unit_key) FILTER (WHERE u.status = 'failed')  AS failed,
    coalesce(sum(u.rows), 0)                              AS rows,
    coalesce(sum(u.seconds), 0)                           AS seconds,
    s.notes
FROM stages s LEFT JOIN units u ON u.stage = s.stage AND u.fingerprint = s.fingerprint
GROUP BY s.stage, s.fingerprint, s.notes, s.position
ORDER BY s.position NULLS LAST, s.stage;

-- Bad inputs of the current plans, grouped by reason.
CREATE OR REPLACE VIEW failures_by_reason AS
SELECT f.stage, f.item_kind, split_part(f.reason, ':', 1) AS reason, count(*) AS items,
       any_value(f.path) AS example_path
FROM item_failures f JOIN stages s ON f.stage = s.stage AND f.fingerprint = s.fingerprint
GROUP BY ALL
ORDER BY items DESC;

-- Metrics of the current plans.
CREATE OR REPLACE VIEW current_metrics AS
SELECT m.stage, m.unit_key, m.name, m.value, m.labels_json, m.recorded_at
FROM metrics m JOIN stages s ON m.stage = s.stage AND m.fingerprint = s.fingerprint;
