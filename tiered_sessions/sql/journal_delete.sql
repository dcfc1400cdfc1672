DELETE FROM ${journal} WHERE seq = ANY($1::bigint[])
