-- Supabase: no object of the tier is reachable by anon or authenticated. Row level security on every table
-- and no grants on any table or sequence, including the two earlier migrations left open: the migrations'
-- own tracking table (created by `tiered-sessions migrate` before any migration runs) and the journal's
-- sequence (default privileges grant sequences too). Plain Postgres has no such roles: the revokes run only
-- where they exist.
DO $$
DECLARE
    object record;
    role_name text;
BEGIN
    FOR object IN
        SELECT c.oid::regclass AS name, c.relkind::text AS kind
        FROM pg_class c
        WHERE c.oid IN ('${table}'::regclass, '${journal}'::regclass, '${layout}'::regclass,
                        '${migrations}'::regclass, pg_get_serial_sequence('${journal}', 'seq')::regclass)
    LOOP
        IF object.kind <> 'S' THEN
            EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', object.name);
        END IF;
        FOREACH role_name IN ARRAY ARRAY['anon', 'authenticated'] LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) THEN
                EXECUTE format('REVOKE ALL ON %s %s FROM %I',
                               CASE WHEN object.kind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, object.name, role_name);
            END IF;
        END LOOP;
    END LOOP;
END
$$;
