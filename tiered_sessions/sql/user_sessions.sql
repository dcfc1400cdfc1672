-- Live sessions of one user (the user_id index), for list_user_sessions when Redis does not hold them all.
SELECT session_id FROM ${table}
WHERE user_id = $1 AND session_state IN ('active', 'closed') AND expires_at > now()
ORDER BY session_id LIMIT 10000
