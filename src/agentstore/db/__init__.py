"""Data access: the pool, the tenant-scoped unit of work, retries and the error table."""

from agentstore.db.database import AppConnection, Database, Record
from agentstore.db.errors import ConstraintReason, map_database_error, register_constraint

__all__ = ["AppConnection", "ConstraintReason", "Database", "Record", "map_database_error", "register_constraint"]
