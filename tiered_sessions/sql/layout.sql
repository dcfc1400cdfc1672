-- Record the tier's layout if no process has ($1: layout version, $2: partitions, $3: Redis key prefix), and
-- return it as recorded (name, value), for the caller to compare with its own.
WITH recorded AS (
    INSERT INTO ${layout} (name, value) VALUES ('layout', $1), ('partitions', $2), ('key_prefix', $3)
    ON CONFLICT (name) DO NOTHING
    RETURNING name, value
)
SELECT name, value FROM recorded
UNION ALL
SELECT name, value FROM ${layout} WHERE name NOT IN (SELECT name FROM recorded)
