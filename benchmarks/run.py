"""The benchmark suite: prints tables and writes JSON. Same code on CPU and GPU (the device is detected).

    python -m benchmarks.run                      # everything (about 30 minutes on a 2-core CPU)
    python -m benchmarks.run --quick              # smaller sizes, for a smoke test
    python -m benchmarks.run --only train_step moe_layer --out results.json

Sections: train_step (ReMoE vs TopK vs dense step in stage III), moe_layer (one MoE layer vs a dense FFN of
equal active FLOPs, with a forward breakdown), layer_vs_torchtitan (the recipe's TopK layer vs torchtitan's
MoE layer with the same weights; the MoE layer vs a dense FFN at 4096 tokens on one thread), dense_start (ReMoE's stages I+II cost), quality (validation
loss over seeds), small (the small configs' routing health and validation loss over 3 seeds with a compute-matched
TopK: hours on a 2-core CPU, not part of the default run). Data-pipeline throughput has its own script: `python -m benchmarks.data_throughput`.
"""

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from benchmarks import layer_vs_torchtitan, moe_layer, train_step, training_runs
from benchmarks.common import pick_device

SECTIONS = {
    "train_step": lambda device, quick: train_step.run(device, quick),
    "moe_layer": lambda device, quick: moe_layer.run(device, quick),
    "layer_vs_torchtitan": lambda device, quick: layer_vs_torchtitan.run(device, quick),
    "dense_start": lambda device, quick: training_runs.dense_start(quick),
    "quality": lambda device, quick: training_runs.quality(quick),
    "small": lambda device, quick: training_runs.small(quick),
}

OPT_IN = {"small"}  # hours on a CPU: run it with --only small


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=[s for s in SECTIONS if s not in OPT_IN])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds")
    p.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/<date>-<device>.json)")
    a = p.parse_args(argv)
    device = pick_device()
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "python": platform.python_version(), "quick": a.quick,
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
    }
    print(f"# remoe-recipe benchmarks — {meta['device']}, torch {meta['torch']}, {meta['date']}")
    results = {"meta": meta}
    for name in a.only:
        results.update(SECTIONS[name](device, a.quick))
    out = a.out or Path(__file__).parent / "results" / f"{meta['date'][:10]}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
