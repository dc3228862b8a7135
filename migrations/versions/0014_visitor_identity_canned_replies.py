"""Visitor identity on chats (name, email, signed identifier), rating comment and time;
per-tenant canned replies.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.add_column(sa.Column("visitor_name", sa.String(length=120), nullable=True))
        batch_op.add_column(sa.Column("visitor_email", sa.String(length=254), nullable=True))
        batch_op.add_column(sa.Column("visitor_identifier", sa.String(length=128), nullable=True))
        batch_op.add_column(
            sa.Column("identity_verified", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("satisfaction_comment", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("rated_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "canned_replies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("shortcut", sa.String(length=40), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_canned_replies_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_canned_replies")),
        sa.UniqueConstraint(
            "tenant_id", "shortcut", name=op.f("uq_canned_replies_tenant_id_shortcut")
        ),
    )
    with op.batch_alter_table("canned_replies", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_canned_replies_tenant_id"), ["tenant_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_canned_replies_created_at"), ["created_at"], unique=False
        )


def downgrade():
    with op.batch_alter_table("canned_replies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_canned_replies_created_at"))
        batch_op.drop_index(batch_op.f("ix_canned_replies_tenant_id"))
    op.drop_table("canned_replies")
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.drop_column("rated_at")
        batch_op.drop_column("satisfaction_comment")
        batch_op.drop_column("identity_verified")
        batch_op.drop_column("visitor_identifier")
        batch_op.drop_column("visitor_email")
        batch_op.drop_column("visitor_name")
