"""The schema of the served zone (issue 9): every table ``sandbox init`` made then.

Zones made before migrations have no ``alembic_version`` table; ``schema_upgrade`` stamps
them at this revision before upgrading. Nothing to create: this is where history starts.
"""

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
