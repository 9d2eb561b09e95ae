"""Token expiry and TOTP per user (``policies.store_logins``); deleted datasets
(``policies.store_datasets``)."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

NAME_LEN = 64


def upgrade() -> None:
    op.create_table(
        "user_logins",
        sa.Column("name", sa.String(NAME_LEN), sa.ForeignKey("users.name"), primary_key=True),
        sa.Column("token_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("totp_sealed", sa.Text, nullable=True),
        sa.Column("totp_confirmed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("totp_last_step", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "dataset_deletions",
        sa.Column("dataset", sa.String(NAME_LEN), sa.ForeignKey("datasets.name"), primary_key=True),
        sa.Column("deleted_by", sa.String(NAME_LEN), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dataset_deletions")
    op.drop_table("user_logins")
