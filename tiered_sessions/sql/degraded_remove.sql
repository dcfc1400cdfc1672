-- remove while Redis is unreachable: tombstone the row and journal it.
WITH removed AS (
    UPDATE ${table} SET session_state = 'removed', session_data = '{}', metadata = '{}',
        updated_at = now(), version = version + 1
    WHERE session_id = $1 AND session_state <> 'removed'
    RETURNING version
)
INSERT INTO ${journal} (session_id, op, args, version_after)
SELECT $1, 'remove', '{}'::jsonb, version FROM removed
RETURNING version_after
