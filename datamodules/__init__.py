"""On-disk embedding caches, the synthetic world, pseudo tuples and batching."""
