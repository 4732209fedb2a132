"""MoE family: host routing + NxDI block mapping, blockwise prefill kernel, selective-load decode kernel."""
from .blockwise import moe_blockwise
from .decode import moe_decode
from .routing import moe_block_mapping, moe_route

__all__ = ["moe_route", "moe_block_mapping", "moe_blockwise", "moe_decode"]
