-- Of the flushed rows a batch statement did not write ($1: their ids; $2: the batch's JSON rows, whole or
-- activity rows), the
-- ones Postgres does not hold as sent: a newer version, or the same version with other contents (a Redis copy
-- older than Postgres, journaled writes it lacks, a newer flush of the same copy), or no row at all (purged
-- meanwhile; version NULL). A row held already at its version with the same contents (a duplicate flush) is
-- durable and not returned. Also says whether journal entries of the session are pending. Activity rows
-- carry no data, metadata or state: they compare as an active row's counters.
SELECT r.i, s.version, EXISTS (SELECT 1 FROM ${journal} AS j WHERE j.session_id = r.i)
FROM json_to_recordset($2::json) AS r(i text, d jsonb, s text, rc int8, td int8, m jsonb, v int8)
     LEFT JOIN ${table} AS s ON s.session_id = r.i
WHERE r.i = ANY($1::text[])
  AND (s.session_id IS NULL OR s.version > r.v OR s.version < r.v
   OR s.session_state IS DISTINCT FROM coalesce(r.s, 'active')
   OR (coalesce(r.s, 'active') <> 'removed'
       AND (s.request_count IS DISTINCT FROM r.rc OR s.total_duration_ms IS DISTINCT FROM r.td
            OR (r.d IS NOT NULL AND s.session_data IS DISTINCT FROM r.d)
            OR (r.m IS NOT NULL AND s.metadata IS DISTINCT FROM r.m))))
