"""Helpers for tests that run the real entry point (`python -m remoe_recipe.train` / torchrun)
in a subprocess and read back what it wrote to TensorBoard (scalars: remoe_recipe.analysis.runs.read_run)."""

import glob
import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train_configs"

# A CPU-sized run: the debug model on short sequences, every step logged, no validation.
FAST = [
    "--training.seq_len", "64",
    "--training.local_batch_size", "4",
    "--metrics.log_freq", "1",
    "--validation.no-enable",
    "--checkpoint.no-enable",
]


def training_command(config: str, dump: Path, *overrides: str, nproc: int = 1) -> tuple[list[str], dict]:
    """The command line and environment of one training job (for tests that drive the process)."""
    args = ["--job.config_file", str(CONFIGS / config), "--job.dump_folder", str(dump), *FAST, *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "remoe_recipe.train", *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "remoe_recipe.train", *args,
        ]
    env = dict(os.environ, OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    return cmd, env


def run_training(
    config: str, dump: Path, *overrides: str, nproc: int = 1, timeout: int = 600, check: bool = True
):
    """Run one training job; raise with its output if it fails (check=False: return it anyway)."""
    cmd, env = training_command(config, dump, *overrides, nproc=nproc)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def image_tags(log_dir: Path) -> set[str]:
    """Tags of the images written under log_dir."""
    tags = set()
    for path in glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True):
        for event in EventFileLoader(path).Load():
            # EventFileLoader migrates legacy image summaries to tensors of the "images" plugin.
            tags.update(
                v.tag for v in event.summary.value
                if v.HasField("image") or v.metadata.plugin_data.plugin_name == "images"
            )
    return tags


def one_line_error(capsys, main, *argv) -> str:
    """Run an entry point's main() that must stop with exit status 2 and one line on stderr; that line."""
    import pytest

    capsys.readouterr()  # drop what the setup printed
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]
