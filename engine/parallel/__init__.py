"""One model over several processes: pipeline stages, each with its own tensor-parallel degree
(partial TP), on torch.distributed (gloo on CPU, NCCL on CUDA). See ``engine.parallel.group``."""

from engine.parallel.shape import GroupShape

__all__ = ["GroupShape"]
