"""Shipping: the Dockerfile and launch scripts pass their linters, and the launch script trains."""

import os
import shutil
import subprocess

import pytest

from remoe_recipe.analysis.runs import read_run
from tests.runs import FAST, REPO

SCRIPTS = ["scripts/train.sh", "scripts/train_multinode.sh", "scripts/slurm.sbatch"]


def _run(cmd, **kw):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, **kw)


def test_dockerfile_passes_hadolint():
    assert shutil.which("hadolint"), "hadolint missing: install the test extra (pip install -e '.[test]')"
    proc = _run(["hadolint", "Dockerfile"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_uses_the_package_dependency_list():
    text = (REPO / "Dockerfile").read_text()
    assert "pip install ." in text  # pyproject.toml: the one dependency list
    assert "requirements" not in text.lower()
    assert "get_encoding('gpt2')" in text  # the GPT-2 BPE is baked in at build time
    assert "USER 1000" in text and "EXPOSE 6006" in text
    assert 'ENTRYPOINT ["scripts/train.sh"]' in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", "outputs"} <= set(ignored)


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_scripts_pass_shellcheck(script):
    assert shutil.which("shellcheck"), "shellcheck missing: install the test extra"
    proc = _run(["shellcheck", script])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_train_script_usage_errors():
    proc = _run(["bash", "scripts/train.sh"])
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = _run(["bash", "scripts/train.sh", "train_configs/nope.toml"])
    assert proc.returncode == 2 and "nope.toml: no such file" in proc.stderr
    proc = _run(["bash", "scripts/train_multinode.sh", "train_configs/debug_remoe.toml"],
                env={k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR")})
    assert proc.returncode != 0 and "NNODES" in proc.stderr


def test_train_script_runs_on_cpu(tmp_path):
    proc = _run(
        ["bash", "scripts/train.sh", "train_configs/debug_dense.toml", "--job.dump_folder", str(tmp_path),
         *FAST, "--training.steps", "3"],
        env=dict(os.environ, NGPU="0"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(read_run(tmp_path)["loss_metrics/global_avg_loss"]) == [1, 2, 3]
