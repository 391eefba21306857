"""Downstream evaluation: lm-eval's own task definitions (ARC-Easy, a multiple-choice task, and
LAMBADA-OpenAI, a last-word task) on tiny local data, through the recipe-native lm-eval model. The
reported accuracies and every request's log-likelihood are checked against a naive computation with the
same model: one unpadded sequence at a time, the continuation's log-probabilities summed by hand.
The exported folder through lm-eval's own `hf` model gives the same log-likelihoods.
"""

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
import lm_eval.tasks  # noqa: E402
import lm_eval.utils  # noqa: E402

from remoe_recipe.analysis.runs import read_run  # noqa: E402
from remoe_recipe.data.tokenizer import load_tokenizer  # noqa: E402
from remoe_recipe.evaluate import main as evaluate_main  # noqa: E402
from remoe_recipe.export import export  # noqa: E402
from remoe_recipe.load_checkpoint import load_trained_model  # noqa: E402
from tests.checkpoints import make_run, tree_snapshot  # noqa: E402
from tests.runs import one_line_error  # noqa: E402

LOGLIK_ATOL = 1e-4  # fp32; batched + padded vs one sequence at a time (measured ~1e-6)
WORDS = "king queen lord lady sword crown night day love death heart blood fire war peace".split()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's split (context tokens, then the rest of context + continuation), computed naively."""
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole]))[0].double(), dim=-1)
    total, greedy = 0.0, True
    for t in range(n_ctx, len(whole)):
        total += logprobs[t - 1, whole[t]].item()
        greedy &= int(logprobs[t - 1].argmax()) == whole[t]
    return total, greedy


def arc_docs(n: int, rng: random.Random) -> list[dict]:
    docs = []
    for i in range(n):
        texts = rng.sample(WORDS, 4)
        docs.append({
            "id": str(i), "question": f"Who carries the {rng.choice(WORDS)} of the {rng.choice(WORDS)}?",
            "choices": {"text": texts, "label": ["A", "B", "C", "D"]}, "answerKey": rng.choice("ABCD"),
        })
    return docs


def lambada_docs(model, tokenizer, n: int, rng: random.Random) -> list[dict]:
    """Half the documents end with the model's greedy next word (a hit), half with a word it does not
    predict, so the accuracy is neither 0 nor 1."""
    docs, hits = [], 0
    while len(docs) < n:
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        ids = tokenizer.encode(context)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        word = None
        for token in logits.argsort(descending=True)[:20].tolist():
            text = tokenizer.decode([token])
            if re.fullmatch(r" [A-Za-z]+", text) and tokenizer.encode(context + text) == ids + [token]:
                word = text[1:]
                break
        if word is not None and hits < n // 2 and int(logits.argmax()) == tokenizer.encode(" " + word)[0]:
            docs.append({"text": f"{context} {word}"})
            hits += 1
        elif len(docs) - hits < n - n // 2:
            docs.append({"text": f"{context} {rng.choice(WORDS)}"})
    return docs


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    model = make_run(tmp / "run", "relu")
    tokenizer = load_tokenizer("builtin")
    rng = random.Random(0)
    data = tmp / "data"
    _write_jsonl(data / "arc_easy" / "test.jsonl", arc_docs(16, rng))
    _write_jsonl(data / "lambada_openai" / "test.jsonl", lambada_docs(model, tokenizer, 12, rng))
    before = tree_snapshot(tmp / "run" / "checkpoint")
    evaluate_main([
        "--checkpoint", str(tmp / "run" / "checkpoint"), "--tasks", "arc_easy,lambada_openai",
        "--data-dir", str(data), "--log-samples", "--batch-size", "5", "--device", "cpu",
    ])
    assert tree_snapshot(tmp / "run" / "checkpoint") == before
    record = json.loads((tmp / "run" / "eval" / "step-3.json").read_text())
    return tmp, model, tokenizer, record


def test_multiple_choice_accuracy_matches_naive_loglikelihoods(evaluated):
    _, model, tokenizer, record = evaluated
    samples = record["samples"]["arc_easy"]
    assert len(samples) == 16
    correct = []
    for sample in samples:
        doc = sample["doc"]
        context = f"Question: {doc['question']}\nAnswer:"
        scores = [loglikelihood(model, tokenizer, context, " " + text)[0] for text in doc["choices"]["text"]]
        logged = [float(r[0][0]) for r in sample["resps"]]
        assert max(abs(a - b) for a, b in zip(scores, logged)) <= LOGLIK_ATOL
        correct.append(max(range(4), key=scores.__getitem__) == "ABCD".index(doc["answerKey"]))
    accuracy = sum(correct) / len(correct)
    assert 0 < accuracy < 1
    assert record["results"]["arc_easy"]["acc,none"] == pytest.approx(accuracy, abs=1e-12)


def test_last_word_accuracy_and_perplexity_match_naive_computation(evaluated):
    _, model, tokenizer, record = evaluated
    samples = record["samples"]["lambada_openai"]
    scores = []
    for sample in samples:
        words = sample["doc"]["text"].split(" ")
        scores.append(loglikelihood(model, tokenizer, " ".join(words[:-1]), " " + words[-1]))
        assert abs(scores[-1][0] - float(sample["resps"][0][0][0])) <= LOGLIK_ATOL
    accuracy = sum(g for _, g in scores) / len(scores)
    assert 0 < accuracy < 1
    result = record["results"]["lambada_openai"]
    assert result["acc,none"] == pytest.approx(accuracy, abs=1e-12)
    assert result["perplexity,none"] == pytest.approx(math.exp(-sum(s for s, _ in scores) / len(scores)), rel=1e-4)


def test_results_written_to_run_folder_and_tensorboard(evaluated):
    tmp, _, _, record = evaluated
    scalars = read_run(tmp / "run" / "tb" / "eval")
    assert scalars["eval/arc_easy"] == {3: pytest.approx(record["results"]["arc_easy"]["acc,none"])}
    assert scalars["eval/lambada_openai"] == {3: pytest.approx(record["results"]["lambada_openai"]["acc,none"])}


def test_exported_folder_through_lm_eval_hf_model_gives_same_loglikelihoods(evaluated, tmp_path):
    tmp, _, _, record = evaluated
    out = export(load_trained_model(tmp / "run" / "checkpoint"), tmp_path / "hf")
    evaluate_main([
        "--hf", str(out), "--tasks", "arc_easy", "--data-dir", str(tmp / "data"), "--log-samples",
        "--limit", "6", "--device", "cpu", "--output", str(tmp_path / "hf.json"),
    ])
    via_hf = json.loads((tmp_path / "hf.json").read_text())["samples"]["arc_easy"]
    native = {s["doc"]["id"]: s for s in record["samples"]["arc_easy"]}
    assert len(via_hf) == 6
    for sample in via_hf:
        a = [float(r[0][0]) for r in sample["resps"]]
        b = [float(r[0][0]) for r in native[sample["doc"]["id"]]["resps"]]
        assert max(abs(x - y) for x, y in zip(a, b)) <= LOGLIK_ATOL


def _error(capsys, *argv) -> str:
    return one_line_error(capsys, evaluate_main, *argv)


def test_bad_input_one_line(evaluated, capsys):
    tmp = evaluated[0]
    ckpt = tmp / "run" / "checkpoint"
    assert "unknown task 'no_such_task'" in _error(capsys, "--checkpoint", ckpt, "--tasks", "no_such_task")
    message = _error(capsys, "--checkpoint", ckpt, "--tasks", "piqa", "--data-dir", tmp / "data")
    assert "no piqa/<split>.jsonl" in message and str(tmp / "data") in message
    assert "no step 9" in _error(capsys, "--checkpoint", ckpt, "--step", 9, "--tasks", "arc_easy")


def test_download_data_writes_the_split_that_is_evaluated(tmp_path):
    """--download-data on a task whose source is a local file (the same code path as the hub)."""
    docs = arc_docs(5, random.Random(1))
    _write_jsonl(tmp_path / "source.jsonl", docs)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mini_arc.yaml").write_text(
        "include: " + json.dumps(str(Path(lm_eval.tasks.__file__).parent / "arc" / "arc_easy.yaml"))
        + f"\ntask: mini_arc\ntag: null\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(tmp_path / 'source.jsonl'))}}}}}\n"
        "training_split: null\nvalidation_split: null\n"
    )
    evaluate_main(["--download-data", str(tmp_path / "data"), "--tasks", "mini_arc", "--include_path", str(tasks)])
    written = [json.loads(line) for line in (tmp_path / "data" / "mini_arc" / "test.jsonl").read_text().splitlines()]
    assert written == docs


def test_rolling_loglikelihood_and_generation_requests(evaluated):
    """The two other request kinds lm-eval sends (perplexity tasks, generation tasks)."""
    from lm_eval.api.instance import Instance

    from remoe_recipe.generate import generate_tokens
    from remoe_recipe.lm_eval_model import RecipeLM

    _, model, tokenizer, _ = evaluated
    lm = RecipeLM(model, tokenizer, max_length=16, batch_size=3)
    text = "the king and the queen of the night love the day of war and peace and fire"
    ids = tokenizer.encode(text)
    assert len(ids) > 16  # several windows of the 16-token context
    # lm-eval's own windows, each scored naively: the wrapper's batching and bookkeeping are under test
    expected = 0.0
    for context_ids, target_ids in map(lm_eval.utils.make_disjoint_window, lm_eval.utils.get_rolling_token_windows(
            token_list=ids, prefix_token=tokenizer.eos_id, max_seq_len=16, context_len=1)):
        whole = context_ids + target_ids
        assert len(whole) <= 17
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), -1)
        expected += sum(lp[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    assert rolling == pytest.approx(expected, abs=LOGLIK_ATOL * len(ids))

    context = "ROMEO. But soft"
    greedy = tokenizer.decode(list(generate_tokens(model, tokenizer.encode(context), 6, 16,
                                                   vocab_size=tokenizer.get_vocab_size())))
    until = greedy[len(greedy) // 2:][:2] or "\n"
    out = lm.generate_until([Instance("generate_until", {}, (context, {"until": [until], "max_gen_toks": 6}), 0)])
    assert out == [greedy.split(until)[0]]


def test_table2_layout_shows_the_papers_row_only_for_the_papers_config():
    from remoe_recipe.evaluate import TABLE2_TASKS, is_paper_config, table

    accuracies = [0.2, 0.45, 0.55, 0.3, 0.35, 0.63, 0.29]
    results = {t: {"acc,none": a, "acc_stderr,none": 0.01} for t, a in zip(TABLE2_TASKS, accuracies)}
    results["my_task"] = {"acc,none": 0.5}
    paper = {"model": {"flavor": "182M"}, "moe": {"router": "relu", "num_experts": 8, "top_k": 1, "granularity": 1,
                                                 "ffn_expansion": 1}}
    assert is_paper_config(paper)
    lines = table(results, "relu", is_paper_config(paper)).splitlines()
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert header == ["model", "ARC-c", "ARC-e", "BoolQ", "HellaSwag", "LAMBADA", "PIQA", "RACE", "Avg"]
    row = [c.strip() for c in lines[2].split("|")[1:-1]]
    # Table 2's column order is ARC-c, ARC-e, ...; lm-eval's names map to it
    assert row == ["this run", "20.00", "45.00", "55.00", "30.00", "35.00", "63.00", "29.00",
                   f"{100 * sum(accuracies) / 7:.2f}"]
    assert [c.strip() for c in lines[3].split("|")[1:-1]][0] == "ReMoE (paper)" and "40.03" in lines[3]
    assert lines[-1] == "my_task: acc 0.5000"
    other = dict(paper, moe=dict(paper["moe"], granularity=2))
    assert not is_paper_config(other)
    assert "paper" not in table(results, "relu", is_paper_config(other))
