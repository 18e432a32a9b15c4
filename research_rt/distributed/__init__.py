"""Tensor parallelism on torch.distributed: the process group (group.py) and the layers that
split one model across its ranks (layers.py). Low in the stack: the loader swaps these layers in,
the executor runs the ranks."""

from research_rt.distributed.group import TPInfo, all_gather_last, all_reduce, init_tp_group

__all__ = ["TPInfo", "all_gather_last", "all_reduce", "init_tp_group"]
