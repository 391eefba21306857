"""Does a run show the paper's routing behaviour? Read from its TensorBoard logs.

    python -m remoe_recipe.analysis.health outputs/debug_remoe [outputs/debug_topk ...]

What the paper shows (§3.5, Fig. 4 and 8) and what is checked, over the last 30 % of the logged steps
("the tail") and over stage III (from the settling step on):
- stage III: the sparsity stays within +-0.03 of the target 1 - k/E over the tail;
- the controller is engaged: lambda moves both ways in the tail and the penalty lambda * L_reg is not
  negligible there (median >= 1e-4 of the LM loss; a lambda that has decayed to nothing means something
  other than the penalty, usually dead experts, holds the sparsity up);
- no starved experts: no expert gets less than 1/64 of its fair share of the routed pairs (the paper's Fig. 8
  threshold) in more than 10 % of stage III's logging windows, counted per expert from RUN/expert_load.jsonl
  (runs without that file: from moe/min_relative_load, i.e. windows in which any expert was starved, stricter);
- load imbalance (max / mean expert load) over the tail, to compare with the TopK run of the same config.
TopK runs report only imbalance and starvation (their sparsity is fixed at 1 - k/E by construction).
"""

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

from remoe_recipe.analysis.runs import read_run
from remoe_recipe.metrics import read_expert_load

TAIL = 0.3
SPARSITY_BAND = 0.03
STARVED_FRACTION = 1 / 64
STARVED_SHARE_LIMIT = 0.10
PENALTY_RATIO = 1e-4


@dataclass
class Health:
    name: str
    steps: int
    settling_step: int | None  # None: TopK, or a ReLU run that never reached its target
    tail_sparsity: tuple[float, float, float]  # mean, min, max
    target: float | None
    tail_lambda: tuple[float, float] | None  # min, max
    lambda_moves_both_ways: bool
    tail_penalty_ratio: float | None  # median lambda * L_reg / median LM loss
    starved_share: float | None  # the worst expert's share of stage III's logging windows (TopK: of the tail's)
    any_starved_share: float | None  # share of those windows in which some expert was starved
    tail_imbalance: float  # median
    tail_layer_sparsity: list[float]

    @property
    def sparsity_at_target(self) -> bool | None:
        if self.target is None:
            return None
        _, low, high = self.tail_sparsity
        return low >= self.target - SPARSITY_BAND and high <= self.target + SPARSITY_BAND

    @property
    def controller_engaged(self) -> bool | None:
        if self.tail_lambda is None:
            return None
        return self.lambda_moves_both_ways and self.tail_penalty_ratio >= PENALTY_RATIO

    @property
    def no_starved_experts(self) -> bool | None:
        return None if self.starved_share is None else self.starved_share <= STARVED_SHARE_LIMIT


def _tail(series: dict[int, float], start: int) -> list[float]:
    return [v for step, v in sorted(series.items()) if step > start]


def _starved_shares(loads: dict[int, list[list[float]]], start: int) -> tuple[float | None, float | None]:
    """(worst expert's starved share, share of windows with any starved expert) over the windows after `start`."""
    windows = [loads[step] for step in sorted(loads) if step > start]
    if not windows:
        return None, None
    experts = [(layer, e) for layer in range(len(windows[0])) for e in range(len(windows[0][layer]))]
    starved = [[w[layer][e] < STARVED_FRACTION for layer, e in experts] for w in windows]
    worst = max(sum(column) for column in zip(*starved)) / len(windows)
    return worst, sum(any(row) for row in starved) / len(windows)


def assess(name: str, scalars: dict[str, dict[int, float]], target: float | None = None,
           expert_load: dict[int, list[list[float]]] | None = None) -> Health:
    """`target`: the ReLU run's 1 - k/E (unused for TopK); `expert_load`: the run's RUN/expert_load.jsonl."""
    loss = scalars.get("loss_metrics/global_avg_loss")
    if not loss or "moe/sparsity" not in scalars:
        raise ValueError(f"{name}: no MoE routing scalars (moe/sparsity) in its TensorBoard logs")
    steps = max(loss)
    tail_start = int(steps * (1 - TAIL))
    relu = "remoe/l1_coeff" in scalars
    sparsity = _tail(scalars["moe/sparsity"], tail_start)
    settling = None
    tail_lambda, both_ways, penalty_ratio = None, False, None
    if relu:
        if target is None:
            raise ValueError(
                f"{name}: a ReLU run needs its target sparsity 1 - k/E (no config.toml in the run folder: give --target)"
            )
        if "remoe/settling_step" in scalars:
            settling = int(min(scalars["remoe/settling_step"].values()))
        lam = _tail(scalars["remoe/l1_coeff"], tail_start)
        tail_lambda = (min(lam), max(lam))
        both_ways = any(b > a for a, b in zip(lam, lam[1:])) and any(b < a for a, b in zip(lam, lam[1:]))
        penalty = statistics.median(_tail(scalars["remoe/penalty"], tail_start))
        penalty_ratio = penalty / statistics.median(_tail(loss, tail_start))
    window_start = settling - 1 if settling is not None else tail_start  # stage III includes its first step
    min_load = _tail(scalars.get("moe/min_relative_load", {}), window_start)
    any_starved = sum(v < STARVED_FRACTION for v in min_load) / len(min_load) if min_load else None
    starved = any_starved
    if expert_load:
        starved, any_starved = _starved_shares(expert_load, window_start)
    layer_tags = sorted(
        (t for t in scalars if t.startswith("moe_layers/sparsity/layer_")), key=lambda t: int(t.rsplit("_", 1)[1])
    )
    return Health(
        name=name,
        steps=steps,
        settling_step=settling,
        tail_sparsity=(statistics.mean(sparsity), min(sparsity), max(sparsity)),
        target=target if relu else None,
        tail_lambda=tail_lambda,
        lambda_moves_both_ways=both_ways,
        tail_penalty_ratio=penalty_ratio,
        starved_share=starved,
        any_starved_share=any_starved,
        tail_imbalance=statistics.median(_tail(scalars["moe/imbalance"], tail_start)),
        tail_layer_sparsity=[statistics.mean(_tail(scalars[t], tail_start)) for t in layer_tags],
    )


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def format_table(rows: list[Health]) -> str:
    head = ("run", "steps", "settled at", "tail sparsity mean [min, max]", "at target", "tail λ [min, max]",
            "penalty / LM loss", "λ engaged", "worst expert starved", "any expert starved", "no starved",
            "tail imbalance",
            "tail per-layer sparsity")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for h in rows:
        mean, low, high = h.tail_sparsity
        lam = f"[{h.tail_lambda[0]:.1e}, {h.tail_lambda[1]:.1e}]" if h.tail_lambda else "-"
        lines.append("| " + " | ".join([
            h.name, str(h.steps), "-" if h.settling_step is None else str(h.settling_step),
            f"{mean:.3f} [{low:.3f}, {high:.3f}]", _mark(h.sparsity_at_target), lam,
            "-" if h.tail_penalty_ratio is None else f"{h.tail_penalty_ratio:.1e}", _mark(h.controller_engaged),
            "-" if h.starved_share is None else f"{100 * h.starved_share:.0f} %",
            "-" if h.any_starved_share is None else f"{100 * h.any_starved_share:.0f} %", _mark(h.no_starved_experts),
            f"{h.tail_imbalance:.2f}",
            " ".join(f"{s:.2f}" for s in h.tail_layer_sparsity),
        ]) + " |")
    return "\n".join(lines)


def target_sparsity_of(run_dir: Path) -> float | None:
    """1 - k/E from the run's saved config (RUN/config.toml), if there is one."""
    import tomllib

    path = run_dir / "config.toml"
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        moe = tomllib.load(f).get("moe", {})
    if "top_k" not in moe or "num_experts" not in moe:
        return None
    return 1 - moe["top_k"] / moe["num_experts"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--target", type=float, default=None,
                   help="target sparsity 1 - k/E when a run folder has no config.toml (default: read it)")
    a = p.parse_args(argv)
    rows = []
    for run_dir in a.run_dirs:
        if not run_dir.is_dir():
            raise SystemExit(f"{run_dir}: no such folder")
        target = a.target if a.target is not None else target_sparsity_of(run_dir)
        try:
            rows.append(assess(run_dir.name, read_run(run_dir), target, read_expert_load(run_dir)))
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(str(e)) from None
    print(format_table(rows))


if __name__ == "__main__":
    main()
