"""Training-dynamics sweep: which settings let a small ReMoE run show the paper's three stages.

    python -m benchmarks.dynamics run --out runs/dynamics [--jobs 2] [--only r_lr5e-4 t_lr5e-4]
    python -m benchmarks.dynamics report runs/dynamics          # health table (remoe_recipe.analysis.health)
    python -m benchmarks.dynamics plot runs/dynamics --out docs/figures/dynamics_batch.png --runs r_lr5e-4 ...
    python -m benchmarks.dynamics layers runs/dynamics --out docs/figures/layers.png --runs r_lr5e-4 ...

Every run is the real entry point on the built-in corpus, 300 steps, one thread each, `--jobs` at a time
(any device: the same command runs on CPU or, faster, on one GPU). docs/training-dynamics.md reads them.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 1 - 1 / 8  # every run: E = 8, k = 1

# The sweep's starting point, pinned here so that every name keeps its meaning whatever the shipped debug configs
# become: the debug model at 8 x 256 tokens with every matrix initialised at the paper's 0.01, the first version's
# lr 2e-3 with a 20-step warmup, and (ReMoE) the paper's lambda_0 = 1e-8 and alpha = 1.2. A run's overrides
# replace these keys.
BASE = ["--training.local_batch_size", "8", "--moe.router_init_std", "0.01", "--optimizer.lr", "2e-3",
        "--lr_scheduler.warmup_steps", "20"]
REMOE_BASE = ["--moe.l1_coeff_init", "1e-8", "--moe.l1_coeff_multiplier", "1.2"]
PAPER_LR = ["--optimizer.lr", "5e-4", "--lr_scheduler.warmup_steps", "30"]
SLOW_LAMBDA = ["--moe.l1_coeff_multiplier", "1.1", "--moe.l1_coeff_init", "1e-6"]
B16 = ["--training.local_batch_size", "16"]


def _ri(std: str) -> list[str]:
    return ["--moe.router_init_std", std]


# name: (config, overrides). r_ = ReMoE, t_ = TopK; the debug model at 8 x 256 tokens unless named.
SWEEP: dict[str, tuple[str, list[str]]] = {
    "r_lr2e-3": ("debug_remoe.toml", []),  # the first version's quick start
    "r_lr5e-4": ("debug_remoe.toml", PAPER_LR),
    "r_lr5e-4_seed1": ("debug_remoe.toml", PAPER_LR + ["--debug.seed", "1"]),
    "r_lr5e-4_warmup200": ("debug_remoe.toml", ["--optimizer.lr", "5e-4", "--lr_scheduler.warmup_steps", "200"]),
    "r_lr1e-3": ("debug_remoe.toml", ["--optimizer.lr", "1e-3", "--lr_scheduler.warmup_steps", "30"]),
    "r_lr5e-4_b32": ("debug_remoe.toml", PAPER_LR + ["--training.local_batch_size", "32"]),
    "r_lr5e-4_b128": ("debug_remoe.toml", PAPER_LR + ["--training.local_batch_size", "128"]),
    "r_lr2e-3_b32": ("debug_remoe.toml", ["--training.local_batch_size", "32"]),
    "r_lr5e-4_a1.1": ("debug_remoe.toml", PAPER_LR + SLOW_LAMBDA),
    "r_lr5e-4_b32_a1.1": ("debug_remoe.toml", PAPER_LR + SLOW_LAMBDA + ["--training.local_batch_size", "32"]),
    "r_lr5e-4_l0=1e-4": ("debug_remoe.toml", PAPER_LR + ["--moe.l1_coeff_init", "1e-4"]),
    "r_lr5e-4_noLB": ("debug_remoe.toml", PAPER_LR + ["--moe.no-load_balance"]),
    "r_lr5e-4_beta2=0.95": ("debug_remoe.toml", PAPER_LR + ["--optimizer.beta2", "0.95"]),
    "r_mini_lr5e-4": ("debug_remoe.toml", PAPER_LR + ["--model.flavor", "mini"]),
    "r_mini_lr5e-4_b32": ("debug_remoe.toml", PAPER_LR + ["--model.flavor", "mini", "--training.local_batch_size", "32"]),
    # Finding 13 (router init) and 15 (the shipped debug configs: ri0.1_a1.1_b16).
    "r_lr5e-4_ri0.025": ("debug_remoe.toml", PAPER_LR + _ri("0.025")),
    "r_lr5e-4_ri0.1": ("debug_remoe.toml", PAPER_LR + _ri("0.1")),
    "r_lr5e-4_ri0.025_a1.1": ("debug_remoe.toml", PAPER_LR + _ri("0.025") + SLOW_LAMBDA),
    "r_lr5e-4_ri0.1_a1.1": ("debug_remoe.toml", PAPER_LR + _ri("0.1") + SLOW_LAMBDA),
    "r_lr5e-4_ri0.1_a1.1_b16": ("debug_remoe.toml", PAPER_LR + _ri("0.1") + SLOW_LAMBDA + B16),
    "t_lr2e-3": ("debug_topk.toml", []),
    "t_lr5e-4": ("debug_topk.toml", PAPER_LR),
    "t_lr5e-4_b32": ("debug_topk.toml", PAPER_LR + ["--training.local_batch_size", "32"]),
    "t_mini_lr5e-4_b32": ("debug_topk.toml", PAPER_LR + ["--model.flavor", "mini", "--training.local_batch_size", "32"]),
    "t_lr5e-4_ri0.1": ("debug_topk.toml", PAPER_LR + _ri("0.1")),
    "t_lr5e-4_ri0.1_b16": ("debug_topk.toml", PAPER_LR + _ri("0.1") + B16),
}


def _command(name: str, out: Path) -> list[str]:
    config, overrides = SWEEP[name]
    base = BASE + REMOE_BASE if config == "debug_remoe.toml" else BASE
    return [
        sys.executable, "-m", "remoe_recipe.train", "--job.config_file", str(REPO / "train_configs" / config),
        "--job.dump_folder", str(out / name), "--checkpoint.no-enable", "--validation.no-enable",
        "--metrics.log_freq", "5", *base, *overrides,  # a flag given twice: the later value wins (argparse)
    ]


def run(names: list[str], out: Path, jobs: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pending, running = list(names), []
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            log = open(out / f"{name}.log", "w")
            running.append((name, subprocess.Popen(_command(name, out), cwd=REPO, env=env, stdout=log, stderr=log)))
        name, proc = running.pop(0)
        if proc.wait() != 0:
            raise SystemExit(f"{name} failed: see {out / (name + '.log')}")
        print(f"{name} done", flush=True)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> None:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    print(f"wrote {out}")


def plot(run_dirs: list[Path], out: Path) -> None:
    plt = _pyplot()

    from remoe_recipe.analysis.health import STARVED_FRACTION
    from remoe_recipe.analysis.runs import read_run

    panels = [
        ("moe/sparsity", "sparsity (target 1 - k/E dashed)", False),
        ("remoe/l1_coeff", "λ", True),
        ("moe/min_relative_load", "least-used expert / fair share (1/64 dashed)", True),
        ("moe/imbalance", "imbalance (max / mean expert load)", False),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for run_dir in run_dirs:
        scalars = read_run(run_dir)
        for ax, (tag, _, _) in zip(axes, panels):
            if tag in scalars:
                steps = sorted(scalars[tag])
                values = [max(scalars[tag][s], 1e-4) if tag == "moe/min_relative_load" else scalars[tag][s] for s in steps]
                ax.plot(steps, values, label=run_dir.name, linewidth=1.2)
    for ax, (_, title, log_y) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if log_y:
            ax.set_yscale("log")
    axes[0].axhline(TARGET, color="k", linestyle="--", linewidth=0.8)
    axes[2].axhline(STARVED_FRACTION, color="k", linestyle="--", linewidth=0.8)
    axes[0].legend(fontsize=8)
    _save(fig, out)


def plot_layers(run_dirs: list[Path], out: Path) -> None:
    """One panel per run: each MoE layer's active experts per token over the steps (the controller holds
    only their mean at k; how it is spread over the layers is learnt)."""
    plt = _pyplot()

    from remoe_recipe.analysis.runs import read_run

    fig, axes = plt.subplots(1, len(run_dirs), figsize=(5 * len(run_dirs), 3.8), sharey=True, squeeze=False)
    for ax, run_dir in zip(axes[0], run_dirs):
        scalars = read_run(run_dir)
        tags = sorted((t for t in scalars if t.startswith("moe_layers/active_experts/layer_")),
                      key=lambda t: int(t.rsplit("_", 1)[1]))
        if not tags:
            raise SystemExit(f"{run_dir}: no moe_layers/active_experts/layer_* scalars (not an MoE run?)")
        for tag in tags:
            steps = sorted(scalars[tag])
            ax.plot(steps, [scalars[tag][s] for s in steps], label=tag.rsplit("/", 1)[1].replace("_", " "))
        ax.axhline(1, color="k", linestyle="--", linewidth=0.8)  # k = 1: TopK's every layer
        ax.set_title(run_dir.name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("active experts per token (k = 1 dashed)")
    axes[0][0].legend(fontsize=8)
    _save(fig, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--only", nargs="*", choices=sorted(SWEEP))
    rep = sub.add_parser("report")
    rep.add_argument("folder", type=Path)
    pl = sub.add_parser("plot")
    pl.add_argument("folder", type=Path)
    pl.add_argument("--runs", nargs="+", required=True)
    pl.add_argument("--out", type=Path, required=True)
    ly = sub.add_parser("layers")
    ly.add_argument("folder", type=Path)
    ly.add_argument("--runs", nargs="+", required=True)
    ly.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.command == "run":
        a.out.mkdir(parents=True, exist_ok=True)
        run(a.only or list(SWEEP), a.out, a.jobs)
    elif a.command == "report":
        from remoe_recipe.analysis.health import assess, format_table
        from remoe_recipe.analysis.runs import read_run

        names = [n for n in SWEEP if (a.folder / n).is_dir()]
        print(format_table([assess(n, read_run(a.folder / n), TARGET) for n in names]))
    elif a.command == "layers":
        plot_layers([a.folder / n for n in a.runs], a.out)
    else:
        plot([a.folder / n for n in a.runs], a.out)


if __name__ == "__main__":
    main()
