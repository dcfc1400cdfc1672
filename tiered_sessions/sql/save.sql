-- Direct save (store used on its own): replace data and metadata (and the counters, where $10 / $11 are
-- given), bump the version.
INSERT INTO ${table} AS s (session_id, session_data, metadata, session_state, user_id, user_type, ip_address,
                           user_agent, created_at, updated_at, last_activity_at, expires_at, version,
                           request_count, total_duration_ms)
VALUES ($1, $2::jsonb, $3::jsonb, $4, $5, $6, $7, $8, now(), now(), now(), now() + make_interval(secs => $9), 1,
        coalesce($10::bigint, 0), coalesce($11::bigint, 0))
ON CONFLICT (session_id) DO UPDATE SET
    session_data = excluded.session_data,
    metadata = excluded.metadata,
    session_state = excluded.session_state,
    user_id = coalesce(excluded.user_id, s.user_id),
    user_type = coalesce(excluded.user_type, s.user_type),
    ip_address = coalesce(excluded.ip_address, s.ip_address),
    user_agent = coalesce(excluded.user_agent, s.user_agent),
    created_at = CASE WHEN s.session_state IN ('removed', 'expired') THEN now() ELSE s.created_at END,
    updated_at = now(),
    last_activity_at = now(),
    expires_at = excluded.expires_at,
    request_count = coalesce($10::bigint,
                             CASE WHEN s.session_state IN ('removed', 'expired') THEN 0 ELSE s.request_count END),
    total_duration_ms = coalesce($11::bigint, CASE WHEN s.session_state IN ('removed', 'expired') THEN 0
                                                   ELSE s.total_duration_ms END),
    version = s.version + 1
RETURNING version
