-- The sessions table: the seed's public.sessions columns plus a per-session version.
-- ${schema}, ${table} (schema-qualified, quoted) and ${table_name} are filled in from the settings.

CREATE SCHEMA IF NOT EXISTS ${schema};

CREATE TABLE IF NOT EXISTS ${table} (
    session_id        text        PRIMARY KEY,
    session_data      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    session_state     text        NOT NULL DEFAULT 'active',
    user_id           text,
    user_type         text,
    ip_address        text,
    user_agent        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    last_activity_at  timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz,
    request_count     bigint      NOT NULL DEFAULT 0,
    total_duration_ms bigint      NOT NULL DEFAULT 0,
    metadata          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    version           bigint      NOT NULL DEFAULT 0
) WITH (fillfactor = 80);  -- free page space so activity updates stay HOT (no index writes)

-- A table that was there before (e.g. the seed's) must match, or we stop here instead of writing into it.
DO $$
DECLARE
    expected jsonb := '{"session_id": ["text", "character varying", "uuid"],
                        "session_data": ["jsonb"], "session_state": ["text", "character varying"],
                        "user_id": ["text", "character varying", "uuid"],
                        "user_type": ["text", "character varying"],
                        "ip_address": ["text", "character varying", "inet"],
                        "user_agent": ["text", "character varying"],
                        "created_at": ["timestamp with time zone"], "updated_at": ["timestamp with time zone"],
                        "last_activity_at": ["timestamp with time zone"],
                        "expires_at": ["timestamp with time zone"],
                        "request_count": ["bigint", "integer"], "total_duration_ms": ["bigint", "integer"],
                        "metadata": ["jsonb"]}';
    col record;
    found text;
    problems text[] := '{}';
BEGIN
    FOR col IN SELECT key, value FROM jsonb_each(expected) LOOP
        SELECT data_type INTO found FROM information_schema.columns
        WHERE table_schema = '${schema_name}' AND table_name = '${table_name}' AND column_name = col.key;
        IF found IS NULL THEN
            problems := problems || format('column %s is missing', col.key);
        ELSIF NOT col.value ? found THEN
            problems := problems || format('column %s is %s, expected one of %s', col.key, found, col.value);
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
                   AND a.attnum = ANY(i.indkey)
                   WHERE i.indrelid = '${table}'::regclass AND i.indisunique AND i.indnatts = 1
                   AND a.attname = 'session_id') THEN
        problems := problems || 'session_id has no unique index (upserts need one)'::text;
    END IF;
    IF array_length(problems, 1) > 0 THEN
        RAISE EXCEPTION 'existing table ${table} is not compatible with tiered_sessions: %',
            array_to_string(problems, '; ');
    END IF;
END
$$;

-- The seed's table has no version column; counters there may be integer.
ALTER TABLE ${table} ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0;
ALTER TABLE ${table} ALTER COLUMN request_count TYPE bigint, ALTER COLUMN total_duration_ms TYPE bigint;

-- Indexes only on columns that rarely change, so flushed activity updates stay HOT. Recovery and cleanup
-- scan by state; per-user lookups by user_id. (No index on last_activity_at / expires_at / version: they
-- change on every flush.)
CREATE INDEX IF NOT EXISTS ${table_name}_state_id_idx ON ${table} (session_state, session_id);
CREATE INDEX IF NOT EXISTS ${table_name}_user_id_idx ON ${table} (user_id) WHERE user_id IS NOT NULL;

-- Supabase: the table is reachable through PostgREST unless row level security says no. RLS on with no
-- policy denies every role but the owner; anon / authenticated get no grants either. Plain Postgres has
-- no such roles, so the revokes run only where they exist.
ALTER TABLE ${table} ENABLE ROW LEVEL SECURITY;
DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) THEN
            EXECUTE format('REVOKE ALL ON TABLE %s FROM %I', '${table}', role_name);
        END IF;
    END LOOP;
END
$$;
