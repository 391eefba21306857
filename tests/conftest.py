import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environment():
    """Tests that run the entry point in-process leave torchrun's variables (RANK, MASTER_PORT, ...) and
    torchtitan's TORCH_* settings in os.environ; a later test's subprocess run would inherit them, skip
    choosing a free port, and collide on a stale one (EADDRINUSE)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
