"""Packed next-token samples read from token shards: no tokenization at training time."""

from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.tools.logging import logger

from remoe_recipe.data.dataset import check_packing, worker_shard
from remoe_recipe.data.sources import DataError
from remoe_recipe.data.shards import TokenShards


class PackedShardDataset(IterableDataset, Stateful):
    """Yields ({"input": x}, y) like PackedTextDataset, from a shard folder's token stream.

    The shards already hold the documents joined with EOS, so sample k is simply
    x = stream[k*L : k*L + L], y = stream[k*L + 1 : k*L + L + 1] (L = seq_len): consecutive
    samples share one token, nothing is padded. `infinite`: the stream repeats forever and
    samples run across the epoch boundary, so no token is dropped; otherwise one pass over the
    samples that fit, (num_tokens - 1) // L of them.

    Sharding: sample k goes to dp rank k % dp_world_size and, inside a rank, its j-th sample to
    dataloader worker j % num_workers. Random access makes this cheap: a worker reads only its
    own samples, and resuming is O(1). State (per worker): the next sample index.
    """

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        infinite: bool = True,
        return_source: bool = False,
        restart_each_iter: bool = False,
        name: str = "dataset",
    ) -> None:
        check_packing(seq_len, dp_rank, dp_world_size)
        self.shards = shards
        self.seq_len = seq_len
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.infinite = infinite
        self.return_source = return_source
        self.restart_each_iter = restart_each_iter
        self.name = name
        self._next: int | None = None  # next global sample index for this (rank, worker)
        self._state_loaded = False

    def __iter__(self):
        if self.restart_each_iter and not self._state_loaded:
            self._next = None
        self._state_loaded = False
        stride, offset = worker_shard(self.dp_rank, self.dp_world_size)
        L, T = self.seq_len, self.shards.num_tokens
        fresh = self._next is None
        k = offset if fresh else self._next
        if k % stride != offset:
            raise ValueError(
                f"{self.name}: the loaded state (sample {k}) belongs to another rank/worker layout "
                f"(this one takes samples = {offset} mod {stride})"
            )
        yielded = 0
        while True:
            if not self.infinite and k * L + L + 1 > T:
                self._next = None  # the next iteration is a new pass
                if fresh and yielded == 0:
                    raise DataError(
                        f"{self.name}: no sample of {L + 1} tokens for dp rank {self.dp_rank} (of "
                        f"{self.dp_world_size}) and this worker in {T} tokens"
                    )
                return
            if k > offset and (k * L) // T != ((k - stride) * L) // T:
                logger.info(f"{self.name}: dp rank {self.dp_rank} starts epoch {(k * L) // T}")
            chunk = torch.from_numpy(self.shards.read(k * L, L + 1))
            inputs: dict[str, Any] = {"input": chunk[:-1]}
            if self.return_source:
                inputs["source"] = self.shards.label_at(k * L)
            self._next = k + stride
            yielded += 1
            yield inputs, chunk[1:]
            k += stride

    def state_dict(self) -> dict[str, Any]:
        return {"next_sample": self._next}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._next = state_dict["next_sample"]
        self._state_loaded = True
