"""Metric counters kept in the database (issue 3)."""
