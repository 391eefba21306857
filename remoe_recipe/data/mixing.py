"""Several packed datasets mixed by weight (the Pile's style of blending), deterministically."""

from typing import Any

from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset

from remoe_recipe.data.sources import BUILTIN_DATASETS, looks_like_path


def parse_mix_entry(entry: str, key: str = "data.mix") -> tuple[float, str]:
    """'WEIGHT SOURCE' -> (weight, source)."""
    parts = entry.strip().split(None, 1)
    try:
        weight = float(parts[0])
    except (ValueError, IndexError):
        weight = None
    if weight is None or len(parts) != 2 or not weight > 0:
        raise ValueError(
            f"{key} entry {entry!r}: expected 'WEIGHT SOURCE' with a weight > 0, "
            "e.g. '0.7 ./data/pile_shards' or '0.3 hf:allenai/c4'"
        )
    return weight, parts[1].strip()


def mix_source(spec: str) -> tuple[str | None, str | None]:
    """(dataset name, dataset path) that a mix entry's SOURCE stands for: a built-in name, a path, or
    a Hugging Face name ("hf:" forces one)."""
    if spec.startswith("hf:"):
        return spec[3:], None
    if spec.lower() not in BUILTIN_DATASETS and looks_like_path(spec):
        return None, spec
    return spec, None


class MixedDataset(IterableDataset, Stateful):
    """Interleaves samples of infinite component datasets so that after n samples component i
    has given as close to n * w_i (weights normalized) as possible.

    The choice is Megatron's blending rule, with no random numbers: sample n comes from the
    component with the largest deficit w_i * (n + 1) - count_i (ties: lowest index). Each
    component packs and shards over ranks/workers on its own, so each (rank, worker) stream
    follows the weights. State: the per-component counts and every component's own state.
    """

    def __init__(self, components: list[IterableDataset], weights: list[float], name: str = "mix"):
        if len(components) != len(weights) or not components:
            raise ValueError(f"{name}: {len(components)} components for {len(weights)} weights")
        if any(not w > 0 for w in weights):
            raise ValueError(f"{name}: weights must be > 0, got {weights}")
        total = sum(weights)
        self.components = components
        self.weights = [w / total for w in weights]
        self.name = name
        self._counts = [0] * len(components)

    def choose(self) -> int:
        n = sum(self._counts) + 1
        deficits = [w * n - c for w, c in zip(self.weights, self._counts)]
        return max(range(len(deficits)), key=lambda i: (deficits[i], -i))

    def __iter__(self):
        iterators = [iter(c) for c in self.components]
        while True:
            i = self.choose()
            sample = next(iterators[i])
            self._counts[i] += 1
            yield sample

    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": list(self._counts),
            "components": [c.state_dict() for c in self.components],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["counts"]) != len(self.components):
            raise ValueError(
                f"{self.name}: the checkpoint mixes {len(state_dict['counts'])} sources, "
                f"data.mix lists {len(self.components)}"
            )
        self._counts = list(state_dict["counts"])
        for c, s in zip(self.components, state_dict["components"]):
            c.load_state_dict(s)
