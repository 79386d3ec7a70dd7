import json

import pytest

from ggfwd.errors import UserError
from ggfwd.tasks import BUILTIN_TASKS, load_examples, load_task


def test_sst2_tsv_dev_and_train(sst2):
    task = load_task("sst2")
    dev = load_examples(sst2["dev"], task)
    assert len(dev) == 872 and {e.label for e in dev} == {0, 1}
    assert dev[0].text == "one long string of cliches ." and dev[0].label == 0
    train = load_examples(sst2["train"], task, limit=100)
    assert len(train) == 100
    long = load_examples(sst2["train"], task, limit=100, min_words=10)
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


def test_packaged_sst2_is_the_glue_files_byte_for_byte(sst2):
    import gzip
    import hashlib

    want = {"train": ("0f7c7389da97a0e006a89ffb5efbcaa5", 67350), "dev": ("2b070f88622773268a9bb41c6e941e60", 873)}
    for split, (md5, lines) in want.items():
        raw = gzip.decompress(sst2[split].read_bytes())
        assert hashlib.md5(raw).hexdigest() == md5 and raw.count(b"\n") == lines
        assert sst2[split].name == f"{split}.tsv.gz" and sst2[split].parent.parent.name == "data"


def test_sst2_override_and_its_error(tmp_path, monkeypatch):
    from ggfwd.demo import sst2_file

    (tmp_path / "dev.tsv").write_text("label\tcontent\n1\tfine\n")
    monkeypatch.setenv("GGFWD_SST2", str(tmp_path))
    assert sst2_file("dev") == tmp_path / "dev.tsv"
    with pytest.raises(UserError, match="holds no train.tsv"):
        sst2_file("train")


def test_gzip_jsonl_and_undecodable_or_damaged_files(tmp_path):
    import gzip

    task = load_task("sst2")
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b'{"text": "fine", "label": 1}\n{"text": "bad", "label": 0}\n'))
    assert [e.label for e in load_examples(tmp_path / "d.jsonl.gz", task)] == [1, 0]
    (tmp_path / "bom.jsonl").write_bytes(b'{"text": "fine", "label": 1}\n\xff\xfe\x00\n')
    with pytest.raises(UserError, match=r"bom.jsonl line 2: not UTF-8"):
        load_examples(tmp_path / "bom.jsonl", task)
    (tmp_path / "bad.tsv").write_bytes(b"label\tsentence\n1\tok\n0\tcaf\xe9\n")
    with pytest.raises(UserError, match=r"bad.tsv line 3: not UTF-8"):
        load_examples(tmp_path / "bad.tsv", task)
    (tmp_path / "cut.tsv.gz").write_bytes(gzip.compress(b"label\tsentence\n" + b"1\tok\n" * 50)[:-12])
    with pytest.raises(UserError, match="damaged or truncated gzip"):
        load_examples(tmp_path / "cut.tsv.gz", task)
    (tmp_path / "t.toml").write_bytes(b'kind = "classification"\n\xff\n')
    with pytest.raises(UserError, match="t.toml line 2: not UTF-8"):
        load_task(str(tmp_path / "t.toml"))
