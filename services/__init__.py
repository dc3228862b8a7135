"""Domain logic as plain functions: they take ids or models, flush and raise; callers commit."""
