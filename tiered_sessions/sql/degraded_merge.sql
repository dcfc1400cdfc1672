-- update while Redis is unreachable: merge top-level keys, within the size limit ($9), and journal it.
WITH changed AS (
    UPDATE ${table} SET
        session_data = session_data || $2::jsonb,
        metadata = metadata || $3::jsonb,
        user_id = coalesce($4, user_id),
        user_type = coalesce($5, user_type),
        ip_address = coalesce($6, ip_address),
        user_agent = coalesce($7, user_agent),
        session_state = coalesce($8, session_state),
        updated_at = now(),
        version = version + 1
    WHERE session_id = $1 AND session_state IN ('active', 'closed') AND expires_at > now()
      AND octet_length((session_data || $2::jsonb)::text) + octet_length((metadata || $3::jsonb)::text) <= $9
    RETURNING version
)
INSERT INTO ${journal} (session_id, op, args, version_after)
SELECT $1, 'merge', jsonb_build_object('data', $2::jsonb, 'metadata', $3::jsonb, 'state', $8::text,
       'attributes', jsonb_strip_nulls(jsonb_build_object('user_id', $4::text, 'user_type', $5::text,
                                                           'ip_address', $6::text, 'user_agent', $7::text))),
       version
FROM changed
RETURNING version_after
