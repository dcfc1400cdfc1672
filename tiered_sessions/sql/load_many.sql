-- Many sessions by id (the read-throughs of one event-loop turn), tombstones and expired rows included.
SELECT ${columns} FROM ${table} WHERE session_id = ANY($1::text[])
