"""Messages are looked up by the message they answer (a reply's start and save, and the
foreign key's ON DELETE SET NULL): an index on in_response_to_id, so neither reads the table.

Revision ID: 0016
Revises: 0015
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade():
    # Built without locking out writes on PostgreSQL: the messages table of a running
    # deployment is large, and visitors keep writing to it.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_messages_in_response_to",
            "messages",
            ["in_response_to_id"],
            postgresql_concurrently=True,
        )


def downgrade():
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_messages_in_response_to", table_name="messages", postgresql_concurrently=True
        )
