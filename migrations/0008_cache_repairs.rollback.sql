-- Undoes 0008_cache_repairs.
DROP TABLE IF EXISTS cache_repairs;
