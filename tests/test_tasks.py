import json

import pytest

from ggfwd.errors import UserError
from ggfwd.tasks import BUILTIN_TASKS, load_examples, load_task


def test_sst2_tsv_dev_and_train(sst2_dir):
    task = load_task("sst2")
    dev = load_examples(sst2_dir / "dev.tsv", task)
    assert len(dev) == 872 and {e.label for e in dev} == {0, 1}
    assert dev[0].text == "one long string of cliches ." and dev[0].label == 0
    train = load_examples(sst2_dir / "train.tsv", task, limit=100)
    assert len(train) == 100
    long = load_examples(sst2_dir / "train.tsv", task, limit=100, min_words=10)
    assert len(long) == 100 and min(len(e.text.split()) for e in long) == 10
    assert sum(len(e.text.split()) < 10 for e in train) > 30  # the filter removed something real


def test_min_words_that_keeps_nothing_is_a_user_error(tmp_path):
    (tmp_path / "d.tsv").write_text("sentence\tlabel\ntoo short\t1\n")
    with pytest.raises(UserError, match="no examples with at least 5 words"):
        load_examples(tmp_path / "d.tsv", load_task("sst2"), min_words=5)


def test_task_file_json_and_toml(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"kind": "classification", "template": "Q: {text}\nA:",
                                                  "labels": {"no": " no", "yes": " yes"}}))
    (tmp_path / "t.toml").write_text('kind = "classification"\ntemplate = "Q: {text}\\nA:"\n'
                                     '[labels]\nno = " no"\nyes = " yes"\n')
    for name in ("t.json", "t.toml"):
        task = load_task(str(tmp_path / name))
        assert task.labels == ("no", "yes") and task.verbalizers == (" no", " yes")
        assert task.label_index("yes", "x") == 1 and task.label_index(0, "x") == 0 and task.label_index("1", "x") == 1


def test_bad_task_definitions(tmp_path):
    (tmp_path / "noslot.json").write_text(json.dumps({"template": "no slot", "labels": {"a": " a", "b": " b"}}))
    with pytest.raises(UserError, match="exactly once"):
        load_task(str(tmp_path / "noslot.json"))
    (tmp_path / "onelabel.json").write_text(json.dumps({"template": "{text}", "labels": {"a": " a"}}))
    with pytest.raises(UserError, match="two labels"):
        load_task(str(tmp_path / "onelabel.json"))


def test_generation_data(tmp_path):
    (tmp_path / "g.jsonl").write_text('{"prompt": "2+2=", "completion": "4"}\n{"prompt": "x"}\n')
    with pytest.raises(UserError, match="line 2: missing string field 'completion'"):
        load_examples(tmp_path / "g.jsonl", BUILTIN_TASKS["generation"])
