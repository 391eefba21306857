"""Small recipe checkpoints for the export / evaluate / generate tests, written in-process.

A run folder as the trainer leaves it (RUN/job_config.json, RUN/checkpoint/step-N as DCP), holding a
freshly initialised debug model. Weights are drawn with a larger std than training's 0.01 so logits are
O(1) and any layout error shows; each router gets a shared random direction added to all its rows, so
the ReLU router gives some tokens zero experts and others several.
"""

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from remoe_recipe.data.tokenizer import load_tokenizer
from remoe_recipe.load_checkpoint import RUN_CONFIG_FILE, model_args_from_job
from remoe_recipe.model import ReMoETransformer
from remoe_recipe.preflight import load_config
from tests.runs import CONFIGS

CONFIG_OF_ROUTER = {"relu": "debug_remoe.toml", "topk": "debug_topk.toml", "dense": "debug_dense.toml"}


def job_dict(router: str, *overrides: str) -> dict:
    return load_config(
        ["--job.config_file", str(CONFIGS / CONFIG_OF_ROUTER[router]), *overrides], check_data=False
    ).to_dict()


def make_run(run: Path, router: str = "relu", *overrides: str, step: int = 3, seed: int = 0,
             init_std: float = 0.04) -> ReMoETransformer:
    """Write RUN/job_config.json and RUN/checkpoint/step-{step}; return the model that was saved."""
    job = job_dict(router, *overrides)
    args = model_args_from_job(job, load_tokenizer(job["model"]["tokenizer_path"] or "builtin"))
    args.init_std = init_std
    torch.manual_seed(seed)
    model = ReMoETransformer(args)
    model.init_weights()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.gate.weight += torch.randn(args.dim) * 2 * init_std
    run.mkdir(parents=True, exist_ok=True)
    (run / RUN_CONFIG_FILE).write_text(json.dumps(job))
    dcp.save(model.state_dict(), checkpoint_id=str(run / "checkpoint" / f"step-{step}"))
    return model.eval()


def tree_snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under path."""
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()
    }
