"""Bundled demo captioners (placeholder)."""
