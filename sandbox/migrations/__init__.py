"""The state database's schema history (Alembic). See ``sandbox.schema_upgrade``."""
