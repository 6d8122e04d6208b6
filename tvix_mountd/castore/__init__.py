"""The store model and its services."""
