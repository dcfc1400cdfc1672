-- The tier's layout, recorded by the first process that starts on it and checked by every later one (the
-- same record lives in Redis, under '<key prefix>:layout'): a process configured with another partition count
-- or another Redis key prefix for this table refuses to start instead of writing where no flusher looks.
-- Also an index for the flusher's question "are journal entries of this session pending?" (refusals.sql).

CREATE TABLE IF NOT EXISTS ${layout} (
    name  text PRIMARY KEY,
    value text NOT NULL
);

ALTER TABLE ${layout} ENABLE ROW LEVEL SECURITY;
DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) THEN
            EXECUTE format('REVOKE ALL ON TABLE %s FROM %I', '${layout}', role_name);
        END IF;
    END LOOP;
END
$$;

CREATE INDEX IF NOT EXISTS "${table_name}_journal_session_id" ON ${journal} (session_id);
