-- The oldest journal entries, for `tiered-sessions journal list` (no arguments: the session contents stay out).
SELECT seq, session_id, op, version_after, created_at FROM ${journal} ORDER BY seq LIMIT $1
