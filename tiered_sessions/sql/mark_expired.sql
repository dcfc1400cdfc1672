-- No version bump: a newer write still waiting in Redis must win over this bookkeeping.
UPDATE ${table} SET session_state = 'expired', updated_at = now()
WHERE session_state IN ('active', 'closed') AND expires_at <= now()
RETURNING ${columns}
