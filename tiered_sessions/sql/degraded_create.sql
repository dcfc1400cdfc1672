-- ensure of a session Postgres does not hold alive, while Redis is unreachable: a new life above any old one.
WITH created AS (
    INSERT INTO ${table} AS s (session_id, session_data, metadata, session_state, user_id, user_type, ip_address,
                               user_agent, created_at, updated_at, last_activity_at, expires_at, version)
    VALUES ($1, $2::jsonb, $3::jsonb, 'active', $4, $5, $6, $7, now(), now(), now(),
            now() + make_interval(secs => $8), 1)
    ON CONFLICT (session_id) DO UPDATE SET
        session_data = excluded.session_data, metadata = excluded.metadata, session_state = 'active',
        user_id = excluded.user_id, user_type = excluded.user_type, ip_address = excluded.ip_address,
        user_agent = excluded.user_agent, created_at = now(), updated_at = now(), last_activity_at = now(),
        expires_at = excluded.expires_at, request_count = 0, total_duration_ms = 0, version = s.version + 1
    WHERE s.session_state IN ('removed', 'expired') OR s.expires_at <= now()
    RETURNING version
)
INSERT INTO ${journal} (session_id, op, args, version_after)
SELECT $1, 'create', '{}'::jsonb, version FROM created
RETURNING version_after
