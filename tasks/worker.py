"""Production worker entry point: `dramatiq tasks.worker` (see the Procfile).

Creating the app configures the Redis broker (dramatiq.set_broker) and declares every actor.
"""

from app import create_app, settle_heap

app = create_app()
settle_heap(app)
