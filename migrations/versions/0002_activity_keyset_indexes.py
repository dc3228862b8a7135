"""Activity log indexes that match the keyset pages (newest first by id).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("activity_logs", schema=None) as batch_op:
        batch_op.drop_index("ix_activity_logs_tenant_type_created")
        batch_op.drop_index("ix_activity_logs_device_created")
        batch_op.create_index("ix_activity_logs_tenant_id", ["tenant_id", "id"], unique=False)
        batch_op.create_index(
            "ix_activity_logs_tenant_type_id", ["tenant_id", "activity_type", "id"], unique=False
        )
        batch_op.create_index(
            "ix_activity_logs_tenant_status_id", ["tenant_id", "status", "id"], unique=False
        )
        batch_op.create_index("ix_activity_logs_device_id", ["device_id", "id"], unique=False)


def downgrade():
    with op.batch_alter_table("activity_logs", schema=None) as batch_op:
        batch_op.drop_index("ix_activity_logs_device_id")
        batch_op.drop_index("ix_activity_logs_tenant_status_id")
        batch_op.drop_index("ix_activity_logs_tenant_type_id")
        batch_op.drop_index("ix_activity_logs_tenant_id")
        batch_op.create_index(
            "ix_activity_logs_device_created", ["device_id", "created_at", "id"], unique=False
        )
        batch_op.create_index(
            "ix_activity_logs_tenant_type_created",
            ["tenant_id", "activity_type", "created_at"],
            unique=False,
        )
