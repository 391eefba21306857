"""How many steps a TopK run needs to match a ReMoE run's training compute.

    python -m remoe_recipe.analysis.compute_match outputs/small_remoe

ReMoE costs more than TopK while it is denser than the target (stages I-II: up to all E experts per token), so
the paper trains its TopK baselines for extra steps to match ReMoE's total compute (§4.3; its "MoE" rows of
Tables 8-10). This reads the ReMoE run's logged active experts per token (`moe/active_experts_per_token`,
linearly interpolated between logged steps, held flat before the first and after the last), adds up the
training FLOPs per token of every step (the model's `flops_per_token`: 6 x active matrix parameters plus
attention, the count torchtitan's MFU uses) and divides by what a TopK step of the same model and batch costs
(k experts per token). Both runs see the same tokens per step, so the batch size cancels. The model comes from
the run's saved config (RUN/config.toml, written by the trainer); overrides after `--` change it.
"""

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from remoe_recipe.analysis.runs import read_run

ACTIVE_TAG = "moe/active_experts_per_token"


def active_per_step(logged: dict[int, float], steps: int) -> list[float]:
    """Active experts per token at steps 1..steps from the logged ones (linear between logged steps)."""
    if not logged:
        raise ValueError(f"no {ACTIVE_TAG} scalars: not a run of a router with experts, or metrics were off")
    points = sorted(logged.items())
    values, i = [], 0
    for step in range(1, steps + 1):
        while i + 1 < len(points) and points[i + 1][0] <= step:
            i += 1
        (s0, v0) = points[i]
        if step <= s0 or i + 1 == len(points):
            values.append(v0)
        else:
            s1, v1 = points[i + 1]
            values.append(v0 + (v1 - v0) * (step - s0) / (s1 - s0))
    return values


def run_length(logged: dict[int, float], configured_steps: int, log_freq: int) -> int:
    """The run's configured steps if its logs reach its last logging window, else its last logged step (a
    run that stopped early is matched for what it trained)."""
    if logged and max(logged) > configured_steps - log_freq:
        return configured_steps
    return max(logged, default=0)


def matched_steps(flops_per_token, active: list[float], top_k: float) -> tuple[float, float]:
    """(TopK steps with the same training FLOPs as the ReMoE run, ReMoE FLOPs per token summed over its
    steps). `flops_per_token(a)`: training FLOPs per token with `a` active experts per token."""
    total = sum(flops_per_token(a) for a in active)
    return total / flops_per_token(top_k), total


@dataclass
class Match:
    steps: int  # the ReMoE run's
    mean_active: float  # active experts per token, averaged over its steps
    topk_steps: float  # TopK steps with the same training FLOPs
    remoe_flops_per_token: float  # averaged over its steps
    topk_flops_per_token: float
    top_k: int

    @property
    def steps_to_train(self) -> int:
        return math.ceil(self.topk_steps)


def match_run(run_dir: Path, overrides: list[str] = ()) -> Match:
    """The compute-matched TopK step count of the ReMoE run in run_dir (its saved config.toml + overrides)."""
    from remoe_recipe.model.args import remoe_flavors
    from remoe_recipe.preflight import load_config

    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise ValueError(f"{run_dir}: no config.toml (the trainer saves the run's resolved config there)")
    config = load_config(["--job.config_file", str(config_path), *overrides], check_data=False)
    args = remoe_flavors()[config.model.flavor]
    args.update_from_config(config)
    if not args.is_moe:
        raise ValueError(f"{config_path}: moe.router = {config.moe.router!r} has no experts; nothing to match")
    logged = read_run(run_dir).get(ACTIVE_TAG, {})
    steps = run_length(logged, config.training.steps, config.metrics.log_freq)
    try:
        active = active_per_step(logged, steps)
    except ValueError as e:
        raise ValueError(f"{run_dir}: {e}") from None
    seq_len = config.training.seq_len
    topk_steps, total = matched_steps(lambda n: args.flops_per_token(seq_len, n), active, args.routed_top_k)
    return Match(
        steps=steps, mean_active=sum(active) / steps, topk_steps=topk_steps, remoe_flops_per_token=total / steps,
        topk_flops_per_token=args.flops_per_token(seq_len, args.routed_top_k), top_k=args.routed_top_k,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the ReMoE run's dump folder")
    p.add_argument("overrides", nargs="*", help="--section.key value overrides of the saved config, after --")
    a = p.parse_args(argv)
    try:
        m = match_run(a.run_dir, a.overrides)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    print(
        f"{a.run_dir}: {m.steps} steps, {m.mean_active:.3f} active experts per token on average "
        f"(TopK: {m.top_k}); {m.remoe_flops_per_token:.4g} training FLOPs per token per step on average, "
        f"{m.topk_flops_per_token:.4g} for TopK."
    )
    extra = m.topk_steps / m.steps - 1
    print(f"compute-matched TopK: {m.topk_steps:.2f} steps ({100 * extra:+.1f} %): --training.steps {m.steps_to_train}")


if __name__ == "__main__":
    main()
