"""The router registry: `[moe] router = NAME` looks NAME up here, and nothing else in the recipe compares
router names. A router is one file in this package (or anywhere: a test, a user's plugin) that calls
`register_router` with a `RouterSpec`: how to build the routing module, the auxiliary objective it trains
with, the [moe] keys it reads and their checks, and the facts other parts of the recipe ask about it
(does it have experts, is its number of (token, expert) pairs known without reading the mask).
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from remoe_recipe.routers.objective import RouterObjective


@dataclass(frozen=True)
class PaperRow:
    """The router's row of the paper's Table 2 (182M, E = 8, k = 1, 30B tokens; zero-shot accuracy, %)."""

    label: str
    accuracies: tuple[float, ...]  # ARC-c, ARC-e, BoolQ, HellaSwag, LAMBADA, PIQA, RACE
    average: float


@dataclass(frozen=True)
class RouterSpec:
    name: str
    summary: str
    """One line: what the router does and where it comes from (shown by show_config and the README)."""

    build: Callable[..., nn.Module] | None
    """build(args, layer_id) -> the routing module of one MoE layer, given the model's ReMoEModelArgs.
    None: the router has no experts (the dense baseline: one SwiGLU FFN per block)."""

    objective: Callable[..., RouterObjective] = RouterObjective
    """objective(args, device) -> what training adds for this router (auxiliary loss, its coefficient's
    schedule, metrics, checkpointed state). Default: nothing."""

    config_keys: tuple[str, ...] = ()
    """The [moe] keys only this router reads (beyond the keys every MoE router shares)."""

    check: Callable[..., list[str]] = lambda moe: []
    """check(moe_config) -> one line per invalid value of the router's own keys, naming the key."""

    variable_pairs: bool = False
    """True when the number of (token, expert) pairs is only known by reading the routing mask (ReLU):
    the MoE layer reads it once per forward, and FSDP prefetches explicitly around that host sync."""

    start_experts_per_token: Callable[..., float] | None = None
    """args -> experts per token at the start of training when that is the memory peak (ReMoE's dense
    stage I); None: the routing is as sparse from step 1 as later. The dry run's memory estimate uses it."""

    paper_table2: PaperRow | None = None

    hf_remote_code: bool = False
    """Whether the Hugging Face export's remote code (hf/modeling_remoe.py) implements this router."""

    @property
    def has_experts(self) -> bool:
        return self.build is not None


_REGISTRY: dict[str, RouterSpec] = {}


class UnknownRouterError(ValueError):
    pass


def register_router(spec: RouterSpec) -> RouterSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"router {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_router(name: str) -> None:
    _REGISTRY.pop(name, None)


def router_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_router(name: str) -> RouterSpec:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownRouterError(f"moe.router = {name!r}: expected one of {router_names()}") from None


def router_keys() -> dict[str, tuple[str, ...]]:
    """[moe] key -> the routers that read it, for every router-specific key."""
    owners: dict[str, tuple[str, ...]] = {}
    for spec in _REGISTRY.values():
        for key in spec.config_keys:
            owners[key] = owners.get(key, ()) + (spec.name,)
    return owners


def build_router(name: str, args, layer_id: int = 0) -> nn.Module:
    spec = get_router(name)
    if spec.build is None:
        raise ValueError(f"moe.router = {name!r} has no experts and no routing module")
    return spec.build(args, layer_id)
