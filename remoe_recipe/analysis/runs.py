"""Compare runs from their TensorBoard logs, without a browser.

    python -m remoe_recipe.analysis.runs outputs/debug_remoe outputs/debug_topk outputs/debug_dense --out runs.png

Each RUN_DIR is a run's dump folder (or any folder holding its event files). Panels: training loss,
validation loss, sparsity, lambda, per-layer sparsity, expert-load imbalance; a panel a run did not log
(e.g. lambda for TopK) simply has no line for it. Runs are named by their folder, with as many parent
folders as it takes to tell runs with the same folder name apart. Validation points are drawn as
markers, the last one labelled with its step; per-layer lines are labelled by run and layer.
"""

import argparse
import glob
import os
from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

LAYER_STYLES = ("-", "--", ":", "-.")
PANELS = [
    ("loss_metrics/global_avg_loss", "training loss", False),
    ("validation_metrics/loss", "validation loss", False),
    ("moe/sparsity", "sparsity (fraction of zero gates)", False),
    ("remoe/l1_coeff", "λ (L1 coefficient)", True),
    ("moe_layers/sparsity/", "per-layer sparsity", False),
    ("moe/imbalance", "expert load imbalance (max / mean)", False),
]


def read_run(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in every event file under run_dir (files in the order they
    were written: a later file's value for a step wins, as after a resume)."""
    files = sorted(glob.glob(str(run_dir / "**" / "events.out.tfevents.*"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard event files (enable [metrics] enable_tensorboard)")
    scalars: dict[str, dict[int, float]] = {}
    for path in files:
        # Raw events: TensorBoard's EventAccumulator keeps a sample per tag and purges steps after a restart.
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                number = scalar_value(value)
                if number is not None:
                    scalars.setdefault(value.tag, {})[event.step] = number
    return scalars


def scalar_value(value) -> float | None:
    """The number a summary value holds: its simple_value, or a tensor of one number (how the scalars
    plugin and tf.summary write them, whatever plugin name); None for images, text and histograms."""
    if value.HasField("simple_value"):
        return value.simple_value
    if not value.HasField("tensor"):
        return None
    from tensorboard.util import tensor_util

    array = tensor_util.make_ndarray(value.tensor)
    return float(array.item()) if array.size == 1 and array.dtype.kind in "fiub" else None


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, extended by parent folders until all names differ (a/run, b/run)."""
    parts = [Path(os.path.abspath(d)).parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise SystemExit(f"the same run folder is given twice: {[str(d) for d in run_dirs]}")


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
            if tag.endswith("/"):  # one line per layer: the run's colour, a line style per layer
                layer_tags = sorted((t for t in scalars if t.startswith(tag)), key=lambda t: int(t.rsplit("_", 1)[-1]))
                for j, layer_tag in enumerate(layer_tags):
                    steps = sorted(scalars[layer_tag])
                    ax.plot(steps, [scalars[layer_tag][s] for s in steps], color=color, linewidth=1,
                            linestyle=LAYER_STYLES[j % len(LAYER_STYLES)], label=f"{name} layer {j}")
            elif tag in scalars:
                steps = sorted(scalars[tag])
                values = [scalars[tag][s] for s in steps]
                # Validation runs every validation.freq steps: markers, so that even one point shows.
                sparse = tag.startswith("validation") or len(steps) < 20
                ax.plot(steps, values, color=color, label=name, marker="o" if sparse else None)
                if tag.startswith("validation"):
                    ax.annotate(f"{values[-1]:.3f} @ step {steps[-1]}", (steps[-1], values[-1]), fontsize=7,
                                textcoords="offset points", xytext=(4, 4), color=color)
        ax.set_title(title)
        ax.set_xlabel("step")
        drawn[title] = len(ax.lines)
        if log_y and ax.lines:
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=7 if len(ax.lines) <= 8 else 5, ncol=1 if len(ax.lines) <= 8 else 2)
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
    for name, run_dir in zip(run_names(a.run_dirs), a.run_dirs):
        runs[name] = read_run(run_dir)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
