"""Dataset versions (``policies.store_datasets``): re-ingesting a name adds a version; grants
and access requests may name one; a job records the version it reads."""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

NAME_LEN = 64


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("version", sa.Integer, nullable=False, server_default="1"))
    op.create_table(
        "dataset_versions",
        sa.Column("dataset", sa.String(NAME_LEN), sa.ForeignKey("datasets.name"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("contract_json", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("persons", sa.BigInteger, nullable=False),
        sa.Column("sites_json", sa.Text, nullable=False),
        sa.Column("cross_site_persons", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("registered_by", sa.String(NAME_LEN), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_by", sa.String(NAME_LEN), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
    )
    # every existing dataset is its own version 1 (a deleted one too: its history)
    op.execute(
        "INSERT INTO dataset_versions (dataset, version, contract_json, path, rows, persons, "
        "sites_json, cross_site_persons, registered_by, created_at) "
        "SELECT name, 1, contract_json, path, rows, persons, sites_json, cross_site_persons, "
        "registered_by, created_at FROM datasets"
    )
    for table in ("access_requests", "grants", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("dataset_version", sa.Integer, nullable=True))


def downgrade() -> None:
    for table in ("jobs", "grants", "access_requests"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("dataset_version")
    op.drop_table("dataset_versions")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("version")
