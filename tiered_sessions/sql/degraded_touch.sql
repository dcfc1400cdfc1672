-- update_activity while Redis is unreachable: the row and its journal entry in one statement.
WITH changed AS (
    UPDATE ${table} SET
        request_count = request_count + 1,
        total_duration_ms = total_duration_ms + $2,
        expires_at = now() + make_interval(secs => $3),
        last_activity_at = now(),
        updated_at = now(),
        version = version + 1
    WHERE session_id = $1 AND session_state = 'active' AND expires_at > now()
    RETURNING version
)
INSERT INTO ${journal} (session_id, op, args, version_after)
SELECT $1, 'touch', jsonb_build_object('duration_ms', $2::bigint), version FROM changed
RETURNING version_after
