"""Alembic scripts for the outbox kit's tables (installed as `outbox._migrations`)."""
