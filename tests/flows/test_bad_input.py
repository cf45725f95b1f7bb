"""Bad input: each a clear message that names the input and the fix, exit code 2, no traceback,
and nothing already computed is lost."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from flows.cli import main
from tests.flows.conftest import tiny_config_dict, write_config


def cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_config_typo_names_the_key_and_the_fix(tmp_path, capsys):
    cfg = tiny_config_dict(tmp_path / "store")
    cfg["generate"]["temprature"] = cfg["generate"].pop("temperature")
    code, _, err = cli(["run", str(write_config(tmp_path / "c.yaml", cfg))], capsys)
    assert code == 2
    assert "generate.temprature: unknown key" in err and "generate.temperature" in err
    assert "Traceback" not in err
    assert not (tmp_path / "store").exists()  # nothing started


def test_wrong_type_names_the_key_and_value(tmp_path, capsys):
    code, _, err = cli(["run", str(write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path))),
                        "--set", "distill.training.lr=fast"], capsys)
    assert code == 2 and "distill.training.lr" in err and "'fast'" in err


def test_missing_model_path_is_named(tmp_path, capsys):
    cfg = tiny_config_dict(tmp_path / "store")
    cfg["teacher"] = {"pretrained": str(tmp_path / "no-such-teacher")}
    cfg["teacher_sft"]["enabled"] = False
    code, _, err = cli(["run", str(write_config(tmp_path / "c.yaml", cfg))], capsys)
    assert code == 2
    assert "teacher.pretrained" in err and "no-such-teacher" in err and "save_pretrained" in err


def test_missing_data_file_is_named(tmp_path, capsys):
    cfg = tiny_config_dict(tmp_path / "store")
    cfg["data"] = {"source": "jsonl", "train_path": str(tmp_path / "nope.jsonl")}
    cfg["distill"]["selection"] = {"every": 0}  # no dev split in these files
    code, _, err = cli(["run", str(write_config(tmp_path / "c.yaml", cfg))], capsys)
    assert code == 2 and "data.train_path" in err and "nope.jsonl" in err


def bad_rows_file(path: Path) -> Path:
    rows = [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say bye.", "input": ""},                        # no output
        {"instruction": "Count.", "input": "1 2", "output": "   "},     # empty output
        {"instruction": "Add.", "input": "1 + 1", "output": "2"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_rows_missing_fields_or_empty_outputs_stop_with_line_numbers(tmp_path, capsys,
                                                                     prefect_api_url):
    cfg = tiny_config_dict(tmp_path / "store")
    cfg["data"] = {"source": "jsonl", "train_path": str(bad_rows_file(tmp_path / "d.jsonl")),
                   "checkable_answers": False}
    cfg["distill"]["selection"] = {"every": 0}  # no dev split in these files
    code, _, err = cli(["stage", "prepare", str(write_config(tmp_path / "c.yaml", cfg))], capsys)
    assert code == 2
    assert "d.jsonl: 2 invalid row(s)" in err
    assert "line 2: missing field(s) output" in err and "line 3: empty 'output'" in err
    assert "data.on_invalid_rows: skip" in err

    # With the fix the message suggests, the stage runs and counts what it left out.
    cfg["data"]["on_invalid_rows"] = "skip"
    code, out, err = cli(["stage", "prepare", str(write_config(tmp_path / "c.yaml", cfg))], capsys)
    assert code == 0, err
    from storage.store import ArtifactStore

    entries = ArtifactStore(tmp_path / "store").list_artifacts()
    assert [e.stage for e in entries] == ["prepare"] and entries[0].status == "complete"
    from storage.store import open_artifact

    art = open_artifact(entries[0].path)
    assert art.info["summary"]["train_skipped"] == 2 and art.read_table("train").num_rows == 2


def test_unusable_store_is_named_and_loses_nothing(tmp_path, capsys, prefect_api_url, tiny_run):
    """A store root that cannot be written (here a regular file where the folder should be)
    stops the run before any work, names the path, and leaves other artifacts intact."""
    config, results, store = tiny_run
    from storage.store import verify

    blocker = tmp_path / "store-is-a-file"
    blocker.write_text("not a folder")
    cfg = tiny_config_dict(blocker)
    code, _, err = cli(["run", str(write_config(tmp_path / "c.yaml", cfg))], capsys)
    assert code == 2 and str(blocker) in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"
    assert all(verify(r["path"]).ok for r in results.values())


def test_tokenizer_without_pad_token_pads_with_eos_and_says_so(shared_tokenizer_dir, caplog):
    """GPT-2's tokenizer has no pad token: the pipeline pads with eos (masked out) and logs how
    to silence it, instead of failing at the first batch."""
    from cot2align_core.config import parse_config
    from cot2align_core.tokenization import pad_token_id
    from tasks.common import load_side_tokenizer

    cfg = tiny_config_dict(Path("unused"))
    cfg["student"] = {"pretrained": str(shared_tokenizer_dir("gpt2-base"))}
    cfg["distill"]["objective"]["kd_base"] = "uld"
    cfg["distill"]["students"] = {}
    with caplog.at_level(logging.WARNING, logger="cot2align"):
        tok = load_side_tokenizer(parse_config(cfg), "student", {})
    assert tok.pad_token_id is None and pad_token_id(tok) == tok.eos_token_id
    assert "no pad token" in caplog.text and "tokenizer.pad_token" in caplog.text
