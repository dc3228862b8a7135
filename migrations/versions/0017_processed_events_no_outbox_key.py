"""Handler records keep the outbox row's id without a foreign key to it.

Outbox rows are never deleted (they are the event history the feeds read), so the key only
checked what the handler runner already knows: it read the row before writing the record.
The check was a lookup and a row lock on the outbox for every record, about 60 % of the
cost of writing one, and a device event writes four.

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("processed_events", schema=None) as batch_op:
        batch_op.drop_constraint("fk_processed_events_event_id_outbox", type_="foreignkey")


def downgrade():
    # Records of events that are no longer in the outbox would fail the key: drop them.
    op.execute(
        sa.text(
            "DELETE FROM processed_events WHERE NOT EXISTS "
            "(SELECT 1 FROM outbox WHERE outbox.id = processed_events.event_id)"
        )
    )
    with op.batch_alter_table("processed_events", schema=None) as batch_op:
        batch_op.create_foreign_key(
            "fk_processed_events_event_id_outbox",
            "outbox",
            ["event_id"],
            ["id"],
            ondelete="CASCADE",
        )
