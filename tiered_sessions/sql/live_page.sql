-- Keyset page of live sessions (for recover_all_sessions): the primary key orders it.
SELECT ${columns} FROM ${table}
WHERE session_id > $1 AND session_state IN ('active', 'closed') AND expires_at > now()
ORDER BY session_id LIMIT $2
