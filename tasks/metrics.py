"""Handlers and tasks for metrics (issue 3)."""
