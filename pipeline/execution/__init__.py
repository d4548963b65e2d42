"""A run: `imagemill.run(spec)` (runner), the shard executor it is given (executor), the actor pool and
retries (scheduler, the default executor), the expander pool, progress, and the budget that stops new shards.
"""
