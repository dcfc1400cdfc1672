-- Tombstones and expired rows older than the retention are deleted for good.
DELETE FROM ${table}
WHERE session_state IN ('removed', 'expired') AND updated_at < now() - make_interval(days => $1)
