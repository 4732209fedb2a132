"""Qwen3-Omni talker code predictor: all residual-code steps in one launch (`code_predictor`)."""
from .unrolled import code_predictor
from .weights import (CodePredictorWeights, pack_weights, random_weights, shard_weights, weights_from_state_dict,
                      weights_from_transformers)

__all__ = ["code_predictor", "CodePredictorWeights", "pack_weights", "random_weights", "shard_weights",
           "weights_from_state_dict", "weights_from_transformers"]
