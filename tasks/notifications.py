"""Handlers and tasks for notifications (issue 3)."""
