"""remoe_recipe.analysis.runs.read_run, the one reader of TensorBoard scalars (the analysis tools and the
tests use it): every event file, later files win, scalars however they are encoded, nothing else."""

import os

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from remoe_recipe.analysis.runs import read_run


def tensor_scalar(tag: str, number: float, plugin: str) -> Summary:
    """A scalar stored as a one-element tensor, as the scalars plugin and tf.summary write it."""
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=plugin))
    return Summary(value=[Summary.Value(tag=tag, tensor=tensor_util.make_tensor_proto(number), metadata=metadata)])


def test_reads_every_scalar_encoding_and_nothing_else(tmp_path):
    first = SummaryWriter(str(tmp_path / "tb" / "rank_0"))
    first.add_scalar("loss", 4.0, 1)
    first.add_scalar("loss", 3.0, 2)
    first.add_scalar("lr", 0.5, 2, new_style=True)  # a float tensor of the "scalars" plugin
    first.file_writer.add_summary(tensor_scalar("tokens", 1024, plugin=""), 2)  # an int tensor, no plugin
    first.add_text("note", "a text summary is a string tensor", 2)
    first.add_image("picture", np.zeros((3, 4, 4)), 2)
    first.add_histogram("weights", np.arange(10.0), 2)
    first.close()
    # A second file written later (a resumed run): its value for step 2 wins.
    second = SummaryWriter(str(tmp_path / "tb" / "rank_0"), filename_suffix=".resumed")
    second.add_scalar("loss", 2.5, 2)
    second.add_scalar("loss", 2.0, 3)
    second.close()
    [old, new] = sorted((tmp_path / "tb" / "rank_0").iterdir(), key=lambda p: p.name.endswith(".resumed"))
    os.utime(old, (1_000, 1_000))
    os.utime(new, (2_000, 2_000))

    assert read_run(tmp_path) == {
        "loss": {1: 4.0, 2: 2.5, 3: 2.0},
        "lr": {2: 0.5},
        "tokens": {2: 1024.0},
    }
