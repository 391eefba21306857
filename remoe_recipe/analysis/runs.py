"""Compare runs from their TensorBoard logs, without a browser.

    python -m remoe_recipe.analysis.runs outputs/debug_remoe outputs/debug_topk outputs/debug_dense --out runs.png

Each RUN_DIR is a run's dump folder (or any folder holding its event files). Panels: training loss,
validation loss, sparsity, lambda, per-layer sparsity, expert-load imbalance; a panel a run did not log
(e.g. lambda for TopK) simply has no line for it.
"""

import argparse
import glob
import os
from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

PANELS = [
    ("loss_metrics/global_avg_loss", "training loss", False),
    ("validation_metrics/loss", "validation loss", False),
    ("moe/sparsity", "sparsity (fraction of zero gates)", False),
    ("remoe/l1_coeff", "λ (L1 coefficient)", True),
    ("moe_layers/sparsity/", "per-layer sparsity", False),
    ("moe/imbalance", "expert load imbalance (max / mean)", False),
]


def read_run(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every event file under run_dir (later files win)."""
    files = sorted(glob.glob(str(run_dir / "**" / "events.out.tfevents.*"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard event files (enable [metrics] enable_tensorboard)")
    scalars: dict[str, dict[int, float]] = {}
    for path in files:
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
                elif value.HasField("tensor") and value.metadata.plugin_data.plugin_name == "scalars":
                    from tensorboard.util import tensor_util

                    scalars.setdefault(value.tag, {})[event.step] = float(tensor_util.make_ndarray(value.tensor))
    return scalars


def plot_runs(runs: dict[str, dict[str, dict[int, float]]], out: Path) -> dict[str, int]:
    """Write the figure; returns {panel title: number of lines drawn}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    drawn = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (tag, title, log_y) in zip(axes.flat, PANELS):
        for i, (name, scalars) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            if tag.endswith("/"):  # one thin line per layer
                layer_tags = sorted((t for t in scalars if t.startswith(tag)), key=lambda t: int(t.rsplit("_", 1)[-1]))
                for j, layer_tag in enumerate(layer_tags):
                    steps = sorted(scalars[layer_tag])
                    ax.plot(steps, [scalars[layer_tag][s] for s in steps], color=color, alpha=0.35 + 0.6 * j / max(len(layer_tags), 1),
                            linewidth=1, label=name if j == 0 else None)
            elif tag in scalars:
                steps = sorted(scalars[tag])
                ax.plot(steps, [scalars[tag][s] for s in steps], color=color, label=name,
                        marker="o" if len(steps) < 20 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        drawn[title] = len(ax.lines)
        if log_y and ax.lines:
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path, help="the PNG to write")
    a = p.parse_args(argv)
    runs = {}
    for run_dir in a.run_dirs:
        if not run_dir.exists():
            raise SystemExit(f"{run_dir}: no such folder")
        runs[run_dir.name or str(run_dir)] = read_run(run_dir)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
