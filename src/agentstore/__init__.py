"""agentstore: an asyncio gRPC data-access service over PostgreSQL and Redis."""

__version__ = "0.1.0"
