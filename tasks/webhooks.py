"""Handlers and tasks for webhooks (issue 3)."""
