"""What a router adds to training beyond the language-model loss: the base class of router objectives.

The trainer owns one objective per run (built by the router's spec) and calls it at fixed points:
- `loss_coeff()` and `reduce_layers(terms)`: the auxiliary loss is coeff * reduce(per-layer loss terms),
  per token (router_loss.py scales it to torchtitan's summed loss). `loss_coeff() is None`: no loss.
- `after_step(step, stats)`: once per optimizer step with the step's reduced routing statistics
  (device tensors; no host synchronisation allowed here, it runs every step).
- `log_tensors(stats)` at logged steps: {TensorBoard tag: 0-d tensor}, read back with the other routing
  metrics in one host transfer, then `scalars(values)` may post-process the host values.
- `state_dict()` / `load_state_dict()`: flat {key: number} entries of the checkpoint's train state.
"""

import torch


class RouterObjective:
    """No auxiliary loss, no state, no router-specific metrics (hash routing, expert choice, dense)."""

    def __init__(self, args=None, device: torch.device | None = None):
        self.args, self.device = args, device

    def loss_coeff(self) -> torch.Tensor | float | None:
        return None

    def reduce_layers(self, layer_terms: torch.Tensor) -> torch.Tensor:
        return layer_terms.sum()

    def after_step(self, step: int, stats) -> None:
        pass

    def log_tensors(self, stats) -> dict[str, torch.Tensor]:
        return {}

    def scalars(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        pass
