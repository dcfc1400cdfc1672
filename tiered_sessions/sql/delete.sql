-- Direct delete: a tombstone (versioned, data wiped), so a late flush of an older version cannot revive it.
UPDATE ${table} SET session_state = 'removed', session_data = '{}', metadata = '{}',
    updated_at = now(), version = version + 1
WHERE session_id = $1 AND session_state <> 'removed'
