"""Microbench cases for the examples family (registered on import)."""
