-- While Redis is unreachable, managers write through to Postgres and journal each operation here; when
-- Redis is back the journal is replayed onto it (then deleted), so writes made on either side both count.

CREATE TABLE IF NOT EXISTS ${journal} (
    seq           bigserial   PRIMARY KEY,
    session_id    text        NOT NULL,
    op            text        NOT NULL,
    args          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    version_after bigint      NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE ${journal} ENABLE ROW LEVEL SECURITY;
DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) THEN
            EXECUTE format('REVOKE ALL ON TABLE %s FROM %I', '${journal}', role_name);
        END IF;
    END LOOP;
END
$$;
