"""The one-process reference for the multi-process layouts: `remoe_recipe.train` in a single
process (no FSDP, no expert parallelism, no collectives), reading its data as D data-parallel ranks
would.

The dataloader shards documents over data-parallel ranks, so a D-rank run and a plain one-process
run see different tokens. Here the one process builds the D ranks' dataloaders and takes one
micro-batch from each in turn; with local_batch_size b and global_batch_size D * b its gradient
accumulation then runs rank 0's micro-batch, rank 1's, ... : the same global batch, split the same
way (a router loss is a per-micro-batch mean, so the split matters), as a D-rank run with one
micro-batch per rank.

    python -m tests.emulated_dp D --job.config_file ... [--section.key value ...]
"""

import sys

from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.protocols.train_spec import get_train_spec

import remoe_recipe.train


class RoundRobin(Stateful):
    def __init__(self, loaders):
        self.loaders = loaders

    def __iter__(self):
        iterators = [iter(loader) for loader in self.loaders]
        while True:
            for it in iterators:
                yield next(it)

    def state_dict(self):
        return {str(r): loader.state_dict() for r, loader in enumerate(self.loaders)}

    def load_state_dict(self, state_dict):
        for r, loader in enumerate(self.loaders):
            loader.load_state_dict(state_dict[str(r)])


def main(ranks: int, argv: list[str]) -> None:
    spec = get_train_spec("remoe")
    build = spec.build_dataloader_fn

    def build_as_ranks(dp_world_size, dp_rank, tokenizer, job_config, **kwargs):
        assert dp_world_size == 1, "the reference runs in one process"
        return RoundRobin([build(ranks, r, tokenizer, job_config, **kwargs) for r in range(ranks)])

    spec.build_dataloader_fn = build_as_ranks
    remoe_recipe.train.main(argv)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
