"""Importing this package registers every family's microbench cases."""
from . import examples  # noqa: F401
from . import attention, deltanet, moe, code_predictor  # noqa: F401,E401
