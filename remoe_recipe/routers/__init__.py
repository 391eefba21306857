"""Routers, one file each, registered by name (registry.py): `[moe] router = NAME`.

Built in: relu (ReMoE), topk (the paper's dMoE baseline), dense (no experts), hash and expert_choice (the
paper's Table 2 baselines). A new router is a new file that calls `register_router`; nothing else in the
recipe needs to change.
"""

from remoe_recipe.routers.objective import RouterObjective
from remoe_recipe.routers.registry import (
    PaperRow, RouterSpec, build_router, get_router, register_router, router_keys, router_names, unregister_router,
)
from remoe_recipe.routers.routing import Router, Routing, load_balance_weights

__all__ = [
    "PaperRow", "Router", "RouterObjective", "RouterSpec", "Routing", "build_router", "get_router",
    "load_balance_weights", "register_router", "router_keys", "router_names", "unregister_router",
]

# Importing a router's file registers it; the order is the order show_config and errors list them in.
from remoe_recipe.routers import relu, topk, dense, hash_routing, expert_choice  # noqa: E402,F401  isort: skip
