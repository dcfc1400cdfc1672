SELECT count(*) FROM ${journal}
