"""Microbench cases for the moe family (registered on import)."""
