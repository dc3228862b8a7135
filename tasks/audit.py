"""Handlers and tasks for audit (issue 3)."""
