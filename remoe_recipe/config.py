"""The recipe's own TOML sections, merged into torchtitan's JobConfig.

torchtitan 0.2.2 loads this module through `[job] custom_config_module = "remoe_recipe.config"`
(the recipe's entry point adds it when absent): it looks for a dataclass named `JobConfig` whose fields
are new sections. `[moe]` in TOML and `--moe.KEY value` on the command line then both work.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from torchtitan.config.job_config import LRScheduler as TorchtitanLRScheduler

from remoe_recipe.data.config import Data

EXPERT_IMPLS = ("grouped_mm", "loop")


@dataclass
class MoEConfig:
    router: str = "relu"
    """A registered router (remoe_recipe/routers): 'relu' (ReMoE: ReLU gates + adaptive L1), 'topk' (the
    paper's softmax-then-TopK baseline with a load-balancing loss), 'dense' (no experts: one SwiGLU FFN of
    width ffn_expansion * ffn), 'hash' (token id mod E), 'expert_choice' (each expert takes its top tokens)."""

    num_experts: int = 8
    """E: experts per layer (before granularity)."""

    top_k: int = 1
    """k: TopK's experts per token, and ReMoE's target sparsity 1 - k/E."""

    granularity: int = 1
    """G: E*G experts of width ffn/G with k*G active (the official --moe-granularity)."""

    l1_coeff_init: float = 1e-8
    """lambda_0 of the adaptive L1 penalty (paper: 1e-8)."""

    l1_coeff_multiplier: float = 1.2
    """alpha: lambda is multiplied by alpha while sparsity is below target, else divided (paper: 1.2)."""

    load_balance: bool = True
    """true: load-balance-aware L1 (paper Eq. 10); false: plain L1 (Eq. 9)."""

    aux_loss_coeff: float = 1e-2
    """TopK's Switch-style load-balancing loss coefficient (paper: 1e-2)."""

    ffn_expansion: int = 1
    """Dense baseline FFN width multiplier (the paper's Dense x8 is 8)."""

    expert_impl: Literal["grouped_mm", "loop"] = "grouped_mm"
    """How experts run: one torch._grouped_mm over all experts, or a per-expert loop."""

    router_init_std: float | None = None
    """Init std of the router's gate weights (relu, topk, expert_choice). Unset: the model's init std, as
    the paper (0.01 for every matrix). Not in the paper, opt-in: the router logits' init std is this times
    sqrt(dim), so at a narrower width than the paper's 768 the paper's 0.01 gives smaller logits
    (0.11 at dim 128 against 0.28); 0.28 / sqrt(dim) keeps the paper's scale (0.025 at dim 128)."""

    pair_chunk_size: int = -1
    """Bounds the activation memory of ReMoE's dense start (stages I-II): when a micro-batch routes more
    (token, expert) pairs than this, they go through the experts in chunks of this many, each recomputed
    in backward instead of keeping its activations. -1 (auto): chunks of T*k pairs while a micro-batch of
    T tokens routes more than 2*T*k (k*G at granularity G; the dense start only) and keeping every layer's
    pairs would take over half the device's memory; 0: never."""


@dataclass
class OptimizerExtras:
    """Keys the recipe adds to torchtitan's [optimizer] section (merged into it)."""

    decay_1d_params: bool = False
    """false (Megatron, the paper's code): no weight decay on RMSNorm weights, biases and other 1-D
    parameters. true: decay every parameter, as torchtitan 0.2.2 does."""


@dataclass
class LRSchedulerExtras:
    """Keys the recipe adds to torchtitan's [lr_scheduler] section (merged into it)."""

    warmup_fraction: float | None = None
    """Warmup as a fraction of the schedule's steps (the paper: 0.01, Megatron's --lr-warmup-fraction).
    Set it or lr_scheduler.warmup_steps, not both."""


@dataclass
class MetricsExtras:
    """Keys the recipe adds to torchtitan's [metrics] section (merged into it)."""

    routing_alert_steps: int = 100
    """Warn (log and the TensorBoard scalar moe_layers/unhealthy/layer_i) when a MoE layer has been 100 %
    sparse, or has had more than dead_expert_share of its experts dead, for this many consecutive steps."""

    dead_expert_share: float = 0.5
    """The share of a layer's experts that may be dead (below 10 % of their fair share of tokens in a step)
    before the routing alert counts the step."""

    log_all_ranks: bool = False
    """false: only rank 0 logs (the other ranks log errors only). true: every rank logs everything."""

    cpu_peak_flops: float = 0.0
    """Peak FLOP/s of the CPU for MFU on a machine without an accelerator (e.g. cores x GHz x FLOPs per cycle);
    0: MFU is not reported on CPU (logged as nan). torchtitan would otherwise divide by an A100's peak."""


@dataclass
class JobConfig:
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: Data = field(default_factory=Data)
    optimizer: OptimizerExtras = field(default_factory=OptimizerExtras)
    lr_scheduler: LRSchedulerExtras = field(default_factory=LRSchedulerExtras)
    metrics: MetricsExtras = field(default_factory=MetricsExtras)


class ConfigError(ValueError):
    """A configuration value is invalid: one line per problem, each naming the key."""

    def lines(self, prefix: str = "config error: ") -> list[str]:
        return [prefix + line for line in str(self).splitlines()]


def moe_problems(moe: MoEConfig) -> list[str]:
    """One line per invalid `moe.*` value: the shared MoE keys here, each router's own keys by its
    registered check (remoe_recipe.routers), and keys set for a router other than the chosen one."""
    from remoe_recipe.routers import get_router, router_keys, router_names

    problems = [p for name, expected in (
        ("num_experts", int), ("top_k", int), ("granularity", int), ("ffn_expansion", int),
        ("l1_coeff_init", float), ("l1_coeff_multiplier", float), ("aux_loss_coeff", float),
        ("load_balance", bool), ("router", str), ("expert_impl", str), ("pair_chunk_size", int),
    ) if (p := _type_problem(f"moe.{name}", getattr(moe, name), expected))]
    init_std = moe.router_init_std  # optional, so not in the table above
    if init_std is not None and (_type_problem("moe.router_init_std", init_std, float) or not init_std > 0):
        problems.append(f"moe.router_init_std = {init_std!r}: expected a number > 0 (or unset: the model's init std)")
    if problems:
        return problems
    if moe.router not in router_names():
        return [f"moe.router = {moe.router!r}: expected one of {router_names()}"]
    spec = get_router(moe.router)
    if moe.expert_impl not in EXPERT_IMPLS:
        problems.append(f"moe.expert_impl = {moe.expert_impl!r}: expected one of {EXPERT_IMPLS}")
    if moe.pair_chunk_size < -1:
        problems.append(
            f"moe.pair_chunk_size = {moe.pair_chunk_size}: expected -1 (auto), 0 (off) or a number of pairs > 0"
        )
    defaults = MoEConfig()
    for key, owners in router_keys().items():
        if moe.router not in owners and getattr(moe, key) != getattr(defaults, key):
            problems.append(
                f"moe.{key} = {getattr(moe, key)!r} is not read by moe.router = {moe.router!r} "
                f"(only by {', '.join(owners)}): remove it or choose that router"
            )
    if spec.has_experts:
        if moe.num_experts < 2:
            problems.append(f"moe.num_experts = {moe.num_experts}: expected >= 2")
        if moe.granularity < 1:
            problems.append(f"moe.granularity = {moe.granularity}: expected >= 1")
        if not 1 <= moe.top_k < moe.num_experts:
            problems.append(
                f"moe.top_k = {moe.top_k}: expected 1 <= top_k < moe.num_experts ({moe.num_experts})"
            )
    return problems + spec.check(moe)


def schedule_problems(config) -> list[str]:
    """The recipe's [lr_scheduler] keys."""
    fraction = config.lr_scheduler.warmup_fraction
    if fraction is None:
        return []
    if not 0 < fraction <= 1:
        return [f"lr_scheduler.warmup_fraction = {fraction}: expected 0 < fraction <= 1"]
    if config.lr_scheduler.warmup_steps != TorchtitanLRScheduler().warmup_steps:
        return [
            f"lr_scheduler.warmup_fraction = {fraction} and lr_scheduler.warmup_steps = "
            f"{config.lr_scheduler.warmup_steps}: set one of them"
        ]
    return []


def metrics_problems(config) -> list[str]:
    """The recipe's [metrics] keys."""
    metrics, problems = config.metrics, []
    if metrics.routing_alert_steps < 1:
        problems.append(f"metrics.routing_alert_steps = {metrics.routing_alert_steps}: expected >= 1")
    if not 0 <= metrics.dead_expert_share < 1:
        problems.append(f"metrics.dead_expert_share = {metrics.dead_expert_share}: expected 0 <= share < 1")
    return problems


def _type_problem(key: str, value, expected: type) -> str | None:
    # bool is an int subclass in Python; a TOML `true` must not pass as a count.
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    return None if ok else f"{key} = {value!r}: expected {expected.__name__}, got {type(value).__name__}"


def _matches(value, annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return True
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and (
            not args or all(_matches(v, args[0]) for v in value)
        )
    if origin is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this checker does not understand: let torchtitan decide


def type_problems(job_config) -> list[str]:
    """TOML values reach torchtitan's dataclasses unchecked: one line per value of the wrong type."""
    problems = []
    for section in dataclasses.fields(job_config):
        value = getattr(job_config, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        hints = typing.get_type_hints(type(value))
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if dataclasses.is_dataclass(v):
                continue
            if not _matches(v, hints.get(f.name, typing.Any)):
                problems.append(
                    f"{section.name}.{f.name} = {v!r}: expected {_type_name(hints[f.name])}, "
                    f"got {type(v).__name__}"
                )
    return problems


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")
