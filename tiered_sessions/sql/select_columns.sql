-- The columns every read returns, in the order ColdRecord takes them.
session_id, session_data::text, session_state, user_id, user_type, ip_address, user_agent,
extract(epoch FROM created_at)::float8, extract(epoch FROM last_activity_at)::float8,
extract(epoch FROM expires_at)::float8, request_count, total_duration_ms, metadata::text, version
