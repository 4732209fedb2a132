"""vllm.distributed.parallel_state's get_tp_group(), reduced to what the models use. Collectives are identities:
tests run one rank per module instance and sum the ranks' partial outputs themselves."""
from __future__ import annotations


class FakeGroup:
    def __init__(self, world_size=1, rank_in_group=0):
        self.world_size = world_size
        self.rank_in_group = rank_in_group
        self.device_group = None

    def all_reduce(self, x):
        return x

    def all_gather(self, x, dim=0):
        return x

    def reduce_scatter(self, x, dim=0):
        return x


_TP = [FakeGroup()]


def get_tp_group():
    return _TP[0]


def set_tp_group(world_size, rank):
    _TP[0] = FakeGroup(world_size, rank)
