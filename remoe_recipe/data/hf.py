"""Hugging Face datasets as a document source.

`training.dataset = "monology/pile-uncopyrighted"` (or allenai/c4 with data.hf_config = "en",
HuggingFaceFW/fineweb, a local folder of data files, ...) goes through `datasets.load_dataset`,
streaming or downloaded (`data.streaming`); a folder written by `save_to_disk` given as a
dataset_path goes through `datasets.load_from_disk`. Offline machines set HF_DATASETS_OFFLINE=1
and read what the cache or the disk holds.
"""

from collections.abc import Iterator

from remoe_recipe.data.config import Data
from remoe_recipe.data.documents import DataError, make_document


class HFSource:
    """Callable document source over one split of a Hugging Face dataset.

    The dataset object is opened once per process (lazily, so a dataloader worker opens its
    own) and iterated from the start, or from `start` with `skip` (cheap for a downloaded
    dataset, a read-and-drop for a streamed one).
    """

    def __init__(self, name: str, data: Data, key: str, split: str, from_disk: bool = False):
        self.name = name
        self.key = key
        self.split = split
        self.data = data
        self.from_disk = from_disk
        self._dataset = None

    def __getstate__(self):
        # Workers reopen the dataset rather than unpickling an open stream.
        return {**self.__dict__, "_dataset": None}

    def _describe(self) -> str:
        if self.from_disk:
            return f"save_to_disk folder, split {self.split!r}"
        cfg = f", config {self.data.hf_config!r}" if self.data.hf_config else ""
        return f"Hugging Face dataset, split {self.split!r}{cfg}, streaming={self.data.streaming}"

    def _fail(self, e: Exception):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return DataError(
            f"{self.key} = {self.name!r}: could not open it as a {self._describe()}: "
            f"{type(e).__name__}: {first}. Built-in datasets: shakespeare; local files go in "
            f"{self.key.split('.')[0]}.dataset_path; the split is data.split / "
            "data.validation_split, the subset data.hf_config."
        )

    def dataset(self):
        if self._dataset is None:
            import datasets

            try:
                if self.from_disk:
                    ds = datasets.load_from_disk(self.name)
                    if isinstance(ds, datasets.DatasetDict):
                        if self.split not in ds:
                            raise ValueError(f"no split {self.split!r}; splits are {sorted(ds)}")
                        ds = ds[self.split]
                else:
                    ds = datasets.load_dataset(
                        self.name,
                        self.data.hf_config or None,
                        split=self.split,
                        streaming=self.data.streaming,
                    )
            except Exception as e:
                raise self._fail(e) from e
            self._dataset = ds
        return self._dataset

    def __call__(self, start: int = 0) -> Iterator[dict]:
        ds = self.dataset()
        if start:
            ds = ds.skip(start)
        where = f"{self.key} = {self.name!r}"
        label = self.name.rstrip("/").split("/")[-1]
        # Batched `iter`, not `for row in ds`: a streamed dataset's __iter__ splits its files
        # over the dataloader workers by itself; here each worker must see the whole stream
        # (the packed dataset picks its own documents by index).
        for batch in ds.iter(batch_size=256):
            columns = list(batch)
            for values in zip(*batch.values()):
                yield make_document(dict(zip(columns, values)), self.data, label, where)
