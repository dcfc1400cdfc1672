-- Keyset page of all sessions (list_sessions without a state).
SELECT ${columns} FROM ${table} WHERE session_id > $1 ORDER BY session_id LIMIT $2
