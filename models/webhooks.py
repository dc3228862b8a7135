"""Outgoing webhooks (issue 3)."""
