"""Microbench cases for the attention family (registered on import)."""
