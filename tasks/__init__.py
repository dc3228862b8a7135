"""Dramatiq set-up (tasks/broker.py) and actors, one module per concern.

Actor modules only *register* functions with events.registry; tasks/broker.py binds them to
the app's broker. `dramatiq tasks.worker` is the production worker entry point.
"""
