-- One session by id, tombstones and expired rows included: the caller needs their version.
SELECT ${columns} FROM ${table} WHERE session_id = $1
