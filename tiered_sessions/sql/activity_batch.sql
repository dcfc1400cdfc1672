-- The flusher's statement for sessions whose data, attributes and state Postgres already holds (claim.lua's
-- activity rows: i id, v version, la/ex times in ms, rc/td counters): only the columns a touch changes, so
-- Redis skips reading the whole hash and Postgres skips parsing jsonb. The version guard is the upsert's.
-- Returns the ids of the rows not written, for refusals.sql (as upsert_batch.sql).
WITH r AS (
    SELECT * FROM json_to_recordset($1::json) AS r(i text, v int8, la int8, ex int8, rc int8, td int8)
), updated AS (
    UPDATE ${table} AS s SET
        session_state = 'active',
        updated_at = now(),
        last_activity_at = to_timestamp(r.la / 1000.0),
        expires_at = to_timestamp(r.ex / 1000.0),
        request_count = r.rc,
        total_duration_ms = r.td,
        version = r.v
    FROM r
    WHERE s.session_id = r.i AND s.version < r.v
    RETURNING s.session_id
)
SELECT r.i FROM r WHERE r.i NOT IN (SELECT session_id FROM updated)
