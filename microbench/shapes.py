"""Per-rank shapes of the target models (from ../shared/reference/anchors.md and transformers.md).

Everything here is per NeuronCore rank: heads and intermediate sizes are already divided by TP
(a KV head count below TP is replicated, so each rank holds one KV head).
"""
from __future__ import annotations

from dataclasses import dataclass

PREFILL_LENGTHS = (512, 2048, 8192)
DECODE_BATCHES = (1, 8, 32)
DECODE_CONTEXT = 8192


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    # gated full attention
    q_heads: int
    kv_heads: int
    head_dim: int
    # gated DeltaNet (0 when the model has none)
    gdn_k_heads: int = 0
    gdn_v_heads: int = 0
    gdn_dk: int = 0
    gdn_dv: int = 0
    conv_kernel: int = 4
    # MoE (0 experts: dense)
    experts: int = 0
    top_k: int = 0
    expert_inter: int = 0
    shared_inter: int = 0
    normalize_topk: bool = True
    # dense MLP (code predictor)
    mlp_inter: int = 0
    layers: int = 0
    vocab: int = 0
    code_groups: int = 0

    def per_rank(self, tp: int) -> "ModelShape":
        def split(n):
            return max(1, n // tp) if n else 0
        return ModelShape(
            name=f"{self.name} tp{tp}", hidden=self.hidden, q_heads=split(self.q_heads),
            kv_heads=split(self.kv_heads), head_dim=self.head_dim, gdn_k_heads=split(self.gdn_k_heads),
            gdn_v_heads=split(self.gdn_v_heads), gdn_dk=self.gdn_dk, gdn_dv=self.gdn_dv,
            conv_kernel=self.conv_kernel, experts=self.experts, top_k=self.top_k,
            expert_inter=split(self.expert_inter), shared_inter=split(self.shared_inter),
            normalize_topk=self.normalize_topk, mlp_inter=split(self.mlp_inter), layers=self.layers,
            vocab=self.vocab, code_groups=self.code_groups)


QWEN35_35B_A3B = ModelShape(
    "qwen3.5-35b-a3b", hidden=2048, q_heads=16, kv_heads=2, head_dim=256,
    gdn_k_heads=16, gdn_v_heads=32, gdn_dk=128, gdn_dv=128,
    experts=256, top_k=8, expert_inter=512, shared_inter=512, normalize_topk=True, layers=40)

QWEN3_NEXT_80B_A3B = ModelShape(
    "qwen3-next-80b-a3b", hidden=2048, q_heads=16, kv_heads=2, head_dim=256,
    gdn_k_heads=16, gdn_v_heads=32, gdn_dk=128, gdn_dv=128,
    experts=512, top_k=10, expert_inter=512, shared_inter=512, normalize_topk=True, layers=48)

QWEN3_OMNI_THINKER = ModelShape(
    "qwen3-omni-30b-a3b thinker", hidden=2048, q_heads=32, kv_heads=4, head_dim=128,
    experts=128, top_k=8, expert_inter=768, shared_inter=0, normalize_topk=True, layers=48)

QWEN3_OMNI_TALKER = ModelShape(
    "qwen3-omni-30b-a3b talker", hidden=1024, q_heads=16, kv_heads=2, head_dim=128,
    experts=128, top_k=6, expert_inter=384, shared_inter=768, normalize_topk=False, layers=20)

QWEN3_OMNI_CODE_PREDICTOR = ModelShape(
    "qwen3-omni-30b-a3b code predictor", hidden=1024, q_heads=16, kv_heads=8, head_dim=128,
    mlp_inter=3072, layers=5, vocab=2048, code_groups=16)

# The named per-rank shapes the microbench uses.
CATALOGUE = {
    "qwen3.5-35b-a3b tp4": QWEN35_35B_A3B.per_rank(4),
    "qwen3.5-35b-a3b tp8": QWEN35_35B_A3B.per_rank(8),
    "qwen3-next-80b-a3b tp4": QWEN3_NEXT_80B_A3B.per_rank(4),
    "qwen3-omni thinker tp8": QWEN3_OMNI_THINKER.per_rank(8),
    "qwen3-omni talker tp8": QWEN3_OMNI_TALKER.per_rank(8),
    "qwen3-omni code predictor tp1": QWEN3_OMNI_CODE_PREDICTOR.per_rank(1),
    "qwen3-omni code predictor tp8": QWEN3_OMNI_CODE_PREDICTOR.per_rank(8),
}
