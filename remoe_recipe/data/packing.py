"""The protocol every packed dataset follows (tokenize-as-you-go text, token shards): next-token
samples of seq_len + 1 tokens, one (data-parallel rank, dataloader worker) share of them, infinite
epochs or one pass, and a per-worker position that StatefulDataLoader checkpoints."""

from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info


def worker_shard(dp_rank: int, dp_world_size: int) -> tuple[int, int]:
    """(stride, offset): this (rank, dataloader worker) takes items i with i % stride == offset.

    Rank r's j-th item is i = r + j * W (W = dp_world_size); worker w takes j % n_workers == w.
    """
    info = get_worker_info()
    n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return dp_world_size * n_workers, dp_rank + worker * dp_world_size


class PackedDataset(IterableDataset, Stateful):
    """Yields ({"input": x}, y): x = window[:seq_len], y = window[1:] of consecutive windows of
    seq_len + 1 tokens that overlap by one token (nothing padded, nothing dropped).

    Subclasses say what their items are and how they are shared (`_samples(stride, offset)`, with
    `worker_shard`'s stride and offset), what their position is (`_reset_position`, `_position_state`,
    `_load_position`: the checkpointed state).

    `infinite`: loop over epochs forever; else one pass, and the next iteration is a new pass.
    restart_each_iter=True (validation): every new iteration starts again at the beginning, so each
    validation run scores the same samples even when it stops early (validation.steps), unless a
    state was loaded just before.
    return_source=True adds input_dict["source"], the label of the document holding the sample's
    first input token. Off by default: torchtitan passes every input_dict entry to the model's
    forward, so training batches must hold only tensors the model accepts.
    """

    def __init__(
        self,
        seq_len: int,
        dp_rank: int,
        dp_world_size: int,
        infinite: bool,
        return_source: bool,
        restart_each_iter: bool,
        name: str,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len = {seq_len}: expected >= 1")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank = {dp_rank} not in [0, dp_world_size = {dp_world_size})")
        self.seq_len = seq_len
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.infinite = infinite
        self.return_source = return_source
        self.restart_each_iter = restart_each_iter
        self.name = name
        self._state_loaded = False
        self._reset_position()

    def __iter__(self):
        if self.restart_each_iter and not self._state_loaded:
            self._reset_position()
        self._state_loaded = False
        yield from self._samples(*worker_shard(self.dp_rank, self.dp_world_size))

    def _sample(self, window: torch.Tensor, source: str | None) -> tuple[dict[str, Any], torch.Tensor]:
        inputs: dict[str, Any] = {"input": window[:-1]}
        if self.return_source:
            inputs["source"] = source
        return inputs, window[1:]

    def state_dict(self) -> dict[str, Any]:
        return self._position_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_position(state_dict)
        self._state_loaded = True

    # What a subclass defines.

    def _reset_position(self) -> None:
        raise NotImplementedError

    def _samples(self, stride: int, offset: int):
        raise NotImplementedError

    def _position_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_position(self, state: dict[str, Any]) -> None:
        raise NotImplementedError
