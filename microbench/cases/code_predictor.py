"""Microbench cases for the code_predictor family (registered on import)."""
