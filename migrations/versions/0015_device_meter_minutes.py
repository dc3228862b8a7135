"""Per-minute meter history of devices (battery, RF and audio min/max).

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "device_meter_minutes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("rf_min", sa.Float(), nullable=True),
        sa.Column("rf_max", sa.Float(), nullable=True),
        sa.Column("audio_min", sa.Float(), nullable=True),
        sa.Column("audio_max", sa.Float(), nullable=True),
        sa.Column("battery_min", sa.Integer(), nullable=True),
        sa.Column("battery_max", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_meter_minutes_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_device_meter_minutes_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_meter_minutes")),
        sa.UniqueConstraint("device_id", "minute", name="uq_device_meter_minutes_device_minute"),
    )
    with op.batch_alter_table("device_meter_minutes", schema=None) as batch_op:
        batch_op.create_index("ix_device_meter_minutes_minute", ["minute"], unique=False)


def downgrade():
    with op.batch_alter_table("device_meter_minutes", schema=None) as batch_op:
        batch_op.drop_index("ix_device_meter_minutes_minute")
    op.drop_table("device_meter_minutes")
