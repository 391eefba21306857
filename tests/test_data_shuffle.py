"""Seeded, windowed document shuffling: a permutation of each window, new every epoch, exactly resumable."""

import torch

from remoe_recipe.data.dataset import PackedTextDataset
from remoe_recipe.data.tokenizer import load_tokenizer

DOCS = [{"text": f"doc {i} " + "word " * (i % 7), "source": str(i)} for i in range(23)]


def _source(start=0):
    return iter(DOCS[start:])


class _Recorder:
    """Tokenizer wrapper that records which document text the dataset tokenizes, in order."""

    def __init__(self, tokenizer):
        self.inner, self.seen = tokenizer, []
        self.eos_id, self.bos_id = tokenizer.eos_id, None

    def encode(self, text, add_bos=False, add_eos=False):
        self.seen.append(text)
        return self.inner.encode(text, add_bos=add_bos, add_eos=add_eos)

    def get_vocab_size(self):
        return self.inner.get_vocab_size()


def _order(window, seed, n, state=None):
    tok = _Recorder(load_tokenizer("builtin"))
    ds = PackedTextDataset(_source, tok, seq_len=4, shuffle_window=window, shuffle_seed=seed)
    if state is not None:
        ds.load_state_dict(state)
    it = iter(ds)
    samples = [next(it) for _ in range(n)]
    return tok.seen, samples, ds


def test_each_window_is_a_seeded_permutation_renewed_every_epoch():
    seen, _, _ = _order(window=8, seed=1, n=120)
    texts = [d["text"] for d in DOCS]
    first_epoch, second_epoch = seen[:23], seen[23:46]
    for w in range(0, 23, 8):  # windows [0, 8), [8, 16), [16, 23)
        assert sorted(first_epoch[w : w + 8]) == sorted(texts[w : w + 8])
    assert first_epoch != texts and second_epoch != first_epoch
    assert sorted(second_epoch) == sorted(texts)
    assert _order(window=8, seed=1, n=120)[0] == seen  # same seed, same order
    assert _order(window=8, seed=2, n=120)[0][:23] != first_epoch
    assert _order(window=0, seed=1, n=120)[0][:23] == texts  # window 0: source order


def test_resume_mid_window_replays_the_same_samples():
    _, straight, _ = _order(window=8, seed=3, n=60)
    _, first, ds = _order(window=8, seed=3, n=25)
    state = ds.state_dict()
    assert state["doc_idx"] % 8 != 0  # stopped inside a window
    _, rest, _ = _order(window=8, seed=3, n=35, state=state)
    for (a_in, a_lab), (b_in, b_lab) in zip(straight, first + rest):
        assert torch.equal(a_in["input"], b_in["input"]) and torch.equal(a_lab, b_lab)
