-- Direct activity update: one atomic statement, the expiry slides by the session's own timeout.
UPDATE ${table} SET
    request_count = request_count + 1,
    total_duration_ms = total_duration_ms + $2,
    expires_at = now() + (expires_at - last_activity_at),
    last_activity_at = now(),
    updated_at = now(),
    version = version + 1
WHERE session_id = $1 AND session_state = 'active' AND expires_at > now()
