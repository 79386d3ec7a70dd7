"""Bad input: one line on stderr, exit code 2, no traceback, no partial output."""

import json

import pytest

from clirun import run_cli
from ggfwd.adapter import LoraAdapter
from ggfwd.base import read_base


@pytest.fixture(scope="module", autouse=True)
def tiny_task(tmp_path_factory):
    """Commands here score the tiny model with the tiny task (single-token verbalizers), so that stderr holds
    the error alone; sst2's verbalizers are several tokens in the tiny vocabulary and would add warnings."""
    global TASK
    from tinytask import TASK_TOML

    TASK = tmp_path_factory.mktemp("task") / "task.toml"
    TASK.write_text(TASK_TOML)
    return TASK


def run(*args, **kw):
    if args and args[0] in ("eval", "train", "calibrate") and "--task" not in args and "--help" not in args:
        args = (*args, "--task", TASK)
    return run_cli(*args, **kw)


def assert_user_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "good.jsonl").write_text('{"text": "the movie was great", "label": 1}\n{"text": "dull", "label": "negative"}\n')
    (d / "notjson.jsonl").write_text('{"text": "fine", "label": 1}\n{text: oops}\n')
    (d / "nofield.jsonl").write_text('{"text": "fine"}\n')
    (d / "badlabel.jsonl").write_text('{"text": "fine", "label": "meh"}\n')
    (d / "empty.jsonl").write_text("\n")
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("files")
    (d / "notgguf.gguf").write_bytes(b"PK\x03\x04 definitely not a model")
    raw = tiny_model.read_bytes()
    (d / "truncated.gguf").write_bytes(raw[: len(raw) // 2])
    base = read_base(tiny_model)
    LoraAdapter.create(base, rank=2).save(d / "adapter.gguf")
    LoraAdapter.create(base, targets=["token_embd"], rank=2).save(d / "embd.gguf")
    foreign = LoraAdapter.create(base, rank=2)
    LoraAdapter("qwen2", foreign.alpha, 2, foreign.targets, foreign.shapes, foreign.params).save(d / "qwen2.gguf")
    return d


def test_eval_on_good_data_reports_json(tiny_model, data, files):
    r = run("eval", "--model", tiny_model, "--adapter", files / "adapter.gguf", "--data", data / "good.jsonl", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["examples"] == 2 and 0 <= out["accuracy"] <= 1 and out["loss"] > 0 and out["tokens"] > 0


@pytest.mark.parametrize("case,fragment", [
    ("missing", "not found"), ("notgguf", "not GGUF"), ("truncated", "truncated")])
def test_bad_model_files(case, fragment, files, data):
    model = {"missing": files / "nope.gguf", "notgguf": files / "notgguf.gguf",
             "truncated": files / "truncated.gguf"}[case]
    assert_user_error(run("eval", "--model", model, "--data", data / "good.jsonl"), fragment)


@pytest.mark.parametrize("adapter,model_fixture,fragment", [
    ("qwen2.gguf", "tiny_model", "architecture"),
    ("adapter.gguf", "other_tiny_model", "shape"),
    ("embd.gguf", "tiny_tied_model", "ties its embeddings"),
])
def test_adapters_that_do_not_fit(adapter, model_fixture, fragment, files, data, request):
    model = request.getfixturevalue(model_fixture)
    assert_user_error(run("eval", "--model", model, "--adapter", files / adapter, "--data", data / "good.jsonl"),
                      fragment)


@pytest.mark.parametrize("name,fragment", [
    ("notjson.jsonl", "line 2: not valid JSON"), ("nofield.jsonl", "missing field 'label'"),
    ("badlabel.jsonl", "label 'meh' is not one of"), ("empty.jsonl", "no examples"),
    ("absent.jsonl", "not found")])
def test_bad_datasets(name, fragment, tiny_model, data):
    assert_user_error(run("eval", "--model", tiny_model, "--data", data / name), fragment)


def test_unknown_task(tiny_model, data):
    assert_user_error(run("eval", "--model", tiny_model, "--data", data / "good.jsonl", "--task", "nope"),
                      "unknown task")


def test_help_everywhere():
    for args in ([], ["eval"], ["train"], ["calibrate"], ["plot"], ["convert"], ["export"]):
        r = run(*args, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout, args


def test_train_on_bad_data_leaves_no_run_folder(tiny_model, data, tmp_path):
    result = run("train", "--model", tiny_model, "--data", data / "notjson.jsonl", "--out", tmp_path / "run")
    assert_user_error(result, "line 2: not valid JSON")
    assert not (tmp_path / "run").exists()


def test_undecodable_data_is_one_line_naming_file_and_line(tiny_model, tmp_path):
    (tmp_path / "bytes.jsonl").write_bytes(b'{"text": "fine", "label": 1}\n\xff\xfe\x00\n')
    assert_user_error(run("eval", "--model", tiny_model, "--data", tmp_path / "bytes.jsonl"),
                      "bytes.jsonl line 2: not UTF-8 text")
    result = run("train", "--model", tiny_model, "--data", tmp_path / "bytes.jsonl", "--out", tmp_path / "run")
    assert_user_error(result, "bytes.jsonl line 2: not UTF-8 text")
    assert not (tmp_path / "run").exists()


def test_multi_token_verbalizer_is_scored_with_a_warning(tiny_model, data, tmp_path):
    (tmp_path / "task.toml").write_text('kind = "classification"\ntemplate = "review {text} sentiment"\n'
                                        '[labels]\nnegative = "t"\npositive = "great movie"\n')
    r = run("eval", "--model", tiny_model, "--data", data / "good.jsonl", "--task", tmp_path / "task.toml", "--json")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'great movie'" in warnings[0] and "only its first token" in warnings[0]
    assert json.loads(r.stdout)["examples"] == 2


def test_boolean_flags_take_no_value_in_help():
    for args, flags in ((["eval"], ["--json", "--verbose"]), (["train"], ["--calibrate", "--resume"]),
                        (["calibrate"], ["--json"])):
        r = run(*args, "--help")
        assert r.returncode == 0
        for f in flags:
            lines = [line for line in r.stdout.splitlines() if f in line.split()]
            assert lines and not any("<bool>" in line or "BOOLEAN" in line for line in lines), r.stdout
