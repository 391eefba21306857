"""The data part of the config checks: one line per problem, naming the key and what it expects."""

import pytest
import tiktoken
from torchtitan.config import JobConfig

from remoe_recipe.config import ConfigError
from remoe_recipe.data.checks import data_config_problems
from remoe_recipe.data.config import Data
from remoe_recipe.preflight import load_config
from tests.runs import CONFIGS


def config(dataset="shakespeare", path=None, tokenizer="builtin", validation=None, **data):
    """torchtitan's JobConfig with the recipe's [data] section, as the recipe's config module merges them."""
    jc = JobConfig()
    jc.data = Data(**data)
    jc.training.dataset, jc.training.dataset_path = dataset, path
    jc.model.tokenizer_path = tokenizer
    if validation is not None:
        jc.validation.enable = True
        jc.validation.dataset, jc.validation.dataset_path = validation
    return jc


def keys(problems: list[str]) -> list[str]:
    """The key each line names: the text before ' = ' (or before ' entry ' for data.mix)."""
    return [p.split(" = ", 1)[0] if not p.startswith("data.mix entry") else "data.mix" for p in problems]


def test_a_good_config_has_no_problem(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert data_config_problems(config()) == []
    assert data_config_problems(config(path=str(tmp_path / "a.jsonl"))) == []
    assert data_config_problems(config(dataset="monology/pile-uncopyrighted", validation=("shakespeare", None))) == []
    assert data_config_problems(config(mix=["2 shakespeare", f"1 {tmp_path}/*.jsonl", "1 hf:allenai/c4", "1 allenai/c4"])) == []


@pytest.mark.parametrize("entry", ["abc", "0 ./data", "-1 shakespeare", "x shakespeare", "2"])
def test_a_mix_entry_that_is_not_weight_source(entry):
    [line] = data_config_problems(config(mix=[entry]))
    assert line.startswith(f"data.mix entry {entry!r}: expected 'WEIGHT SOURCE' with a weight > 0")


def test_a_mix_path_must_exist_unless_paths_are_not_checked(tmp_path):
    jc = config(mix=[f"1 {tmp_path}/nope", f"1 {tmp_path}/*.parquet", "1 shakespeare"])
    assert data_config_problems(jc) == [
        f"data.mix entry '1 {tmp_path}/nope': no such file, folder or glob match",
        f"data.mix entry '1 {tmp_path}/*.parquet': no such file, folder or glob match",
    ]
    assert data_config_problems(jc, check_paths=False) == []


def test_a_mix_replaces_the_training_dataset_keys():
    # torchtitan's default training.dataset (c4_test) is refused alone, ignored beside a mix.
    assert keys(data_config_problems(config(dataset="c4_test"))) == ["training.dataset"]
    assert data_config_problems(config(dataset="c4_test", path="/nope", mix=["1 shakespeare"])) == []


def test_dataset_paths_must_exist(tmp_path):
    missing = str(tmp_path / "nope")
    assert data_config_problems(config(path=missing)) == [
        f"training.dataset_path = {missing!r}: no such file, folder or glob match"
    ]
    assert data_config_problems(config(path=str(tmp_path / "*.jsonl"))) == [
        f"training.dataset_path = {str(tmp_path / '*.jsonl')!r}: no such file, folder or glob match"
    ]
    assert keys(data_config_problems(config(validation=("shakespeare", missing)))) == ["validation.dataset_path"]
    jc = config(validation=("shakespeare", missing))
    jc.validation.enable = False  # a disabled validation's keys are not read
    assert data_config_problems(jc) == []
    assert data_config_problems(config(path=missing, validation=("x", missing)), check_paths=False) == []


@pytest.mark.parametrize("section", ["training", "validation"])
@pytest.mark.parametrize("name", ["c4_test", "c4_validation", "", "not a name!", "./no/such/folder"])
def test_dataset_names_the_recipe_cannot_read(section, name):
    jc = config(validation=("shakespeare", None))
    getattr(jc, section).dataset = name
    [line] = data_config_problems(jc)
    assert line.startswith(f"{section}.dataset = {name!r}: ")
    assert f"{section}.dataset_path" in line or "Hugging Face" in line  # says where else to look


def test_a_folder_dataset_is_checked_only_with_paths():
    assert data_config_problems(config(dataset="./no/such/folder"), check_paths=False) == []


def test_unknown_tokenizer_name_lists_the_known_ones():
    [line] = data_config_problems(config(tokenizer="gpt3"))
    assert line.startswith("model.tokenizer_path = 'gpt3': ")
    assert "'builtin'" in line and "'gpt2'" in line and "'cl100k_base'" in line and ".tiktoken" in line


def test_known_tokenizer_names_are_not_loaded(monkeypatch):
    # gpt2 may need a download; the check must pass offline (the run says what to do then).
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    for name in ("gpt2", "cl100k_base", "builtin", None):
        assert data_config_problems(config(tokenizer=name)) == []


def test_a_tokenizer_file_must_exist_and_parse(tmp_path):
    bad = tmp_path / "vocab.tiktoken"
    bad.write_text("IQ== 0\nthis is not a ranks line\n")
    [line] = data_config_problems(config(tokenizer=str(bad)))
    assert line.startswith(f"model.tokenizer_path = {str(bad)!r}: line 2 is not 'base64-token rank'")
    [line] = data_config_problems(config(tokenizer=str(tmp_path / "none.tiktoken")))
    assert line == f"model.tokenizer_path = {str(tmp_path / 'none.tiktoken')!r}: no such file"
    assert data_config_problems(config(tokenizer=str(bad)), check_paths=False) == []


def test_several_problems_give_one_line_each(tmp_path):
    jc = config(
        path=str(tmp_path / "nope"), validation=("c4_validation", None), tokenizer="gpt3",
        mix=["abc", "1 shakespeare"], shuffle_window=-1,
    )
    problems = data_config_problems(jc)
    # The mix replaces training.dataset_path, so that missing path is not a problem.
    assert keys(problems) == ["data.shuffle_window", "data.mix", "validation.dataset", "model.tokenizer_path"]
    assert all("\n" not in p for p in problems)


def test_the_config_entry_point_refuses_a_bad_mix_before_training():
    argv = ["--job.config_file", str(CONFIGS / "debug_remoe.toml"), "--data.mix", "abc"]
    with pytest.raises(ConfigError, match=r"data\.mix entry 'abc': expected 'WEIGHT SOURCE'"):
        load_config(argv)
