"""Microbench cases for the deltanet family (registered on import)."""
