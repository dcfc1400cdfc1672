SELECT count(*) FROM ${table} WHERE session_state IN ('active', 'closed') AND expires_at > now()
