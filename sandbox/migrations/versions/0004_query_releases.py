"""Released DP query answers (``sandbox.query_releases``)."""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "query_releases",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("project", sa.String(200), nullable=False),
        sa.Column("dataset", sa.String(200), nullable=False),
        sa.Column("query_key", sa.String(64), nullable=False),
        sa.Column("query_json", sa.Text, nullable=False),
        sa.Column("answer_json", sa.Text, nullable=False),
        sa.Column("epsilon", sa.Float, nullable=False),
        sa.Column("delta", sa.Float, nullable=False),
        sa.Column("asked_by", sa.String(200), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("project", "query_key", name="uq_query_releases_project_key"),
    )


def downgrade() -> None:
    op.drop_table("query_releases")
