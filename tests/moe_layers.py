"""Routing modules by name for tests that build a bare MoE layer (the trainer builds them through the
registry from a model's args)."""

from remoe_recipe.routers.relu import ReLURouter
from remoe_recipe.routers.topk import TopKRouter


def make_router(name: str, dim: int, num_experts: int, top_k: int):
    if name == "relu":
        return ReLURouter(dim, num_experts, top_k, load_balance=True)
    if name == "topk":
        return TopKRouter(dim, num_experts, top_k)
    raise ValueError(f"no test router {name!r}")
