-- The flusher's one statement per batch: $1 is a JSON array of rows built by claim.lua (short keys: i id,
-- d data, s state, u/ut/ip/ua attributes, c/la/ex times in ms, rc/td counters, m metadata, v version).
-- One text parameter keeps the statement constant for any batch size (one prepared statement) and costs
-- the client nothing per row; the version guard makes replays and late or duplicate flushes harmless.
-- Returns the ids of the rows not written (the guard refused them, or Postgres holds that version already):
-- the flusher asks refusals.sql about those, in a statement of its own so it sees what concurrent flushes
-- committed meanwhile (this statement's snapshot would not).
WITH r AS (
    SELECT * FROM json_to_recordset($1::json)
        AS r(i text, d jsonb, s text, u text, ut text, ip text, ua text, c int8, la int8, ex int8, rc int8,
             td int8, m jsonb, v int8)
), written AS (
    INSERT INTO ${table} AS s (
        session_id, session_data, session_state, user_id, user_type, ip_address, user_agent,
        created_at, updated_at, last_activity_at, expires_at, request_count, total_duration_ms, metadata, version)
    SELECT r.i, r.d, r.s, r.u, r.ut, r.ip, r.ua, to_timestamp(r.c / 1000.0), now(), to_timestamp(r.la / 1000.0),
           to_timestamp(r.ex / 1000.0), r.rc, r.td, r.m, r.v
    FROM r
    ON CONFLICT (session_id) DO UPDATE SET
        session_data = excluded.session_data,
        session_state = excluded.session_state,
        user_id = excluded.user_id,
        user_type = excluded.user_type,
        ip_address = excluded.ip_address,
        user_agent = excluded.user_agent,
        created_at = excluded.created_at,
        updated_at = excluded.updated_at,
        last_activity_at = excluded.last_activity_at,
        expires_at = excluded.expires_at,
        request_count = excluded.request_count,
        total_duration_ms = excluded.total_duration_ms,
        metadata = excluded.metadata,
        version = excluded.version
    WHERE s.version < excluded.version
    RETURNING s.session_id
)
SELECT r.i FROM r WHERE r.i NOT IN (SELECT session_id FROM written)
