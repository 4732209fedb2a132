"""MoE family: host routing + NxDI block mapping, blockwise prefill kernel, selective-load decode kernel, and the
converters from transformers' weight layout to the kernels' (`weights_from_transformers`, `weights_from_state_dict`)."""
from .blockwise import moe_blockwise
from .decode import moe_decode
from .routing import moe_block_mapping, moe_route
from .weights import (MoEWeights, experts_from_transformers, shared_from_transformers, weights_from_state_dict,
                      weights_from_transformers)

__all__ = ["moe_route", "moe_block_mapping", "moe_blockwise", "moe_decode", "MoEWeights", "weights_from_transformers",
           "weights_from_state_dict", "experts_from_transformers", "shared_from_transformers"]
