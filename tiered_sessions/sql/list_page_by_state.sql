-- Keyset page of one state: served by the (session_state, session_id) index.
SELECT ${columns} FROM ${table} WHERE session_state = $1 AND session_id > $2 ORDER BY session_id LIMIT $3
