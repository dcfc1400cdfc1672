-- The flusher's one statement per batch. Arrays keep the text constant for any batch size (one prepared
-- statement); the version guard makes replays and late or duplicate flushes harmless.
INSERT INTO ${table} AS s (
    session_id, session_data, session_state, user_id, user_type, ip_address, user_agent,
    created_at, updated_at, last_activity_at, expires_at, request_count, total_duration_ms, metadata, version)
SELECT r.session_id, r.session_data::jsonb, r.session_state, r.user_id, r.user_type, r.ip_address, r.user_agent,
       to_timestamp(r.created_at), now(), to_timestamp(r.last_activity_at), to_timestamp(r.expires_at),
       r.request_count, r.total_duration_ms, r.metadata::jsonb, r.version
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::float8[], $9::float8[], $10::float8[], $11::int8[], $12::int8[], $13::text[], $14::int8[])
     AS r(session_id, session_data, session_state, user_id, user_type, ip_address, user_agent,
          created_at, last_activity_at, expires_at, request_count, total_duration_ms, metadata, version)
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
