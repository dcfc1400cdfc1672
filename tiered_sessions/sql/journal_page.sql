-- The oldest journal entries, locked for this replayer (others skip them) until its transaction ends.
SELECT seq, session_id, op, args::text, version_after FROM ${journal}
ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED
