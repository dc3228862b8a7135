"""Visitor message language and escalation reason; per-tenant escalation phrases.

Revision ID: 0007
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("language", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("escalation_reason", sa.String(length=200), nullable=True))
    op.create_table(
        "escalation_rules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("language", sa.String(length=8), nullable=False),
        sa.Column("phrase", sa.String(length=200), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_escalation_rules_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_escalation_rules")),
        sa.UniqueConstraint(
            "tenant_id",
            "language",
            "phrase",
            name=op.f("uq_escalation_rules_tenant_id_language_phrase"),
        ),
    )
    with op.batch_alter_table("escalation_rules", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_escalation_rules_tenant_id"), ["tenant_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_escalation_rules_created_at"), ["created_at"], unique=False
        )


def downgrade():
    with op.batch_alter_table("escalation_rules", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_escalation_rules_created_at"))
        batch_op.drop_index(batch_op.f("ix_escalation_rules_tenant_id"))
    op.drop_table("escalation_rules")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("escalation_reason")
        batch_op.drop_column("language")
