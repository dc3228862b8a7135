"""Per-operator read marks of chats (unread state in the inbox).

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "chat_reads",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("chat_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("last_read_message_id", sa.Integer(), nullable=False),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["chat_id"],
            ["chats.id"],
            name=op.f("fk_chat_reads_chat_id_chats"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_chat_reads_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_chat_reads_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_reads")),
        sa.UniqueConstraint("chat_id", "user_id", name=op.f("uq_chat_reads_chat_id_user_id")),
    )
    with op.batch_alter_table("chat_reads", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_chat_reads_user_id"), ["user_id"], unique=False)


def downgrade():
    with op.batch_alter_table("chat_reads", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_chat_reads_user_id"))
    op.drop_table("chat_reads")
