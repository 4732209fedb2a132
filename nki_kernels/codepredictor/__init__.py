"""Qwen3-Omni talker code predictor: all residual-code steps in one launch (`code_predictor`); tensor-parallel
launches with in-kernel collectives (`code_predictor_tp` for all ranks, `code_predictor_rank` for one rank's
process)."""
from .unrolled import code_predictor, code_predictor_rank, code_predictor_tp
from .weights import (CodePredictorWeights, pack_weights, random_weights, shard_weights, weights_from_state_dict,
                      weights_from_transformers)

__all__ = ["code_predictor", "code_predictor_tp", "code_predictor_rank", "CodePredictorWeights", "pack_weights",
           "random_weights", "shard_weights", "weights_from_state_dict", "weights_from_transformers"]
