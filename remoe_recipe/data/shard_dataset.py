"""Packed next-token samples read from token shards: no tokenization at training time."""

from typing import Any

import torch
from torchtitan.tools.logging import logger

from remoe_recipe.data.documents import DataError
from remoe_recipe.data.packing import PackedDataset
from remoe_recipe.data.shards import TokenShards


class PackedShardDataset(PackedDataset):
    """Samples (see PackedDataset) from a shard folder's token stream.

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
        super().__init__(seq_len, dp_rank, dp_world_size, infinite, return_source, restart_each_iter, name)
        self.shards = shards

    def _reset_position(self) -> None:
        self._next: int | None = None  # next global sample index for this (rank, worker)

    def _samples(self, stride: int, offset: int):
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
            window = torch.from_numpy(self.shards.read(k * L, L + 1))
            self._next = k + stride
            yielded += 1
            yield self._sample(window, self.shards.label_at(k * L) if self.return_source else None)
            k += stride

    def _position_state(self) -> dict[str, Any]:
        return {"next_sample": self._next}

    def _load_position(self, state: dict[str, Any]) -> None:
        self._next = state["next_sample"]
