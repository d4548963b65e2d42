"""A run: `imagemill.run(spec)` (runner), the actor pool and retries (scheduler), the expander pool,
progress, and the budget that stops new shards.
"""
