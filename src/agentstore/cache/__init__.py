"""Read-through caching of entities: L1 (per-process LRU), L2 (Redis) and single-flight fills.

EntityCache owns each kind's loader and encoder."""
