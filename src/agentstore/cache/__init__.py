"""Redis-side caching machinery: the cross-process invalidation bus."""
