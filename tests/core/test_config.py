"""The YAML config: every shipped config loads; bad keys, types and files give errors that name
the key path and the fix; ``--set`` overrides; per-stage fingerprint params stay independent."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cot2align_core.config import (
    ConfigError,
    PipelineConfig,
    apply_override,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def demo_dict() -> dict:
    return yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())


def config_error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml")
    return str(info.value)


# --------------------------------------------------------------------------- shipped configs
def test_the_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "qwen1.5-1.8b_to_gpt2-base.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    raw = yaml.safe_load(path.read_text())
    assert cfg.name == raw["name"]
    assert [s.label for s in cfg.students()][0] == cfg.distill.label


def test_paper_configs_carry_the_papers_settings():
    cfg = load_config(REPO / "configs" / "qwen1.5-1.8b_to_gpt2-base.yaml")
    assert cfg.data.source == "jsonl" and cfg.data.cot_requires_input
    assert cfg.generate.temperature == 1.0 and cfg.generate.top_p == 1.0 and cfg.generate.n == 1
    assert (cfg.tokenize.max_length, cfg.tokenize.max_prompt_length) == (512, 256)
    assert cfg.distill.training.lr == pytest.approx(5e-4)
    assert cfg.distill.objective.kd_temperature == 2.0
    assert len(cfg.evaluate.seeds) == 5


# --------------------------------------------------------------------------- bad keys
def test_a_typo_names_the_full_path_and_the_key_meant():
    data = demo_dict()
    data["generate"]["temprature"] = 0.7
    msg = config_error(data)
    assert "generate.temprature" in msg and "unknown key" in msg
    assert "did you mean 'generate.temperature'" in msg
    assert "test.yaml" in msg


def test_an_unknown_nested_key_under_ot_is_named_with_its_path():
    data = demo_dict()
    data["distill"]["objective"]["ot"]["epsilon"] = 0.1
    msg = config_error(data)
    assert "distill.objective.ot.epsilon: unknown key" in msg
    del data["distill"]["objective"]["ot"]["epsilon"]
    data["distill"]["objective"]["ot"]["max_iters"] = 50
    assert "did you mean 'distill.objective.ot.max_iter'" in config_error(data)


def test_an_unknown_key_without_a_close_match_lists_the_known_keys():
    data = demo_dict()
    data["tokenize"]["zzz"] = 1
    msg = config_error(data)
    assert "tokenize.zzz: unknown key" in msg
    assert "known keys here:" in msg and "max_prompt_length" in msg


def test_a_typo_inside_a_students_objective_gets_a_hint():
    data = demo_dict()
    data["distill"]["students"]["sft"]["objective"]["alhpa"] = 0.0
    msg = config_error(data)
    assert "distill.students.sft.objective.alhpa: unknown key" in msg
    assert "did you mean 'distill.students.sft.objective.alpha'" in msg


def test_a_bad_value_inside_a_students_training_names_its_path():
    data = demo_dict()
    data["distill"]["students"]["sft"]["training"] = {"lr": -1}
    msg = config_error(data)
    assert "distill.students.sft.training.lr" in msg and "greater than 0" in msg


def test_the_old_baselines_section_says_where_it_went():
    data = demo_dict()
    data["evaluate"]["baselines"] = {"sft": {"alpha": 0.0}}
    assert "moved to distill.students" in config_error(data)


def test_students_are_overrides_of_the_main_objective():
    data = demo_dict()
    data["distill"]["students"] = {"no_cross_b": {"objective": {"ot": {"pairs": {"cross_b": 0.0}}}},
                                   "short": {"training": {"steps": 10}}}
    cfg = parse_config(data)
    st = {s.label: s for s in cfg.students()}
    assert list(st) == ["cot2align", "no_cross_b", "short"]
    assert st["no_cross_b"].objective.ot.pairs == {"main": 1.0, "cross_a": 1.0, "cross_b": 0.0}
    assert st["no_cross_b"].objective.kd_base == cfg.distill.objective.kd_base
    assert st["short"].training.steps == 10 and st["short"].training.lr == cfg.distill.training.lr
    assert st["short"].objective == cfg.distill.objective


def test_a_student_may_not_take_the_main_students_label():
    data = demo_dict()
    data["distill"]["students"]["cot2align"] = {}
    assert "the label is the main student's" in config_error(data)


def test_selection_needs_a_dev_split():
    data = demo_dict()
    data["distill"]["selection"] = {"every": 100}
    data["data"]["demo"]["n_dev"] = 0
    assert "needs a dev split" not in str(parse_config(copy.deepcopy(demo_dict())))
    assert "selects the best checkpoint on a dev split" in config_error(data)


def test_a_typo_in_a_top_level_section_name():
    data = demo_dict()
    data["tokenise"] = data.pop("tokenize")
    msg = config_error(data)
    assert "tokenise: unknown key (did you mean 'tokenize'?)" in msg


def test_a_wrong_type_names_the_path_and_the_bad_value():
    data = demo_dict()
    data["distill"]["training"]["lr"] = "fast"
    msg = config_error(data)
    assert "distill.training.lr" in msg and "'fast'" in msg
    assert "number" in msg


def test_an_out_of_range_value_and_a_bad_choice():
    data = demo_dict()
    data["generate"]["top_p"] = 1.5
    data["distill"]["objective"]["kd_base"] = "dskdd"
    msg = config_error(data)
    assert "generate.top_p" in msg and "1.5" in msg
    assert "distill.objective.kd_base" in msg and "'dskdd'" in msg


def test_every_error_is_reported_at_once():
    data = demo_dict()
    data["generate"]["temprature"] = 0.7
    data["distill"]["training"]["lr"] = "fast"
    msg = config_error(data)
    assert "generate.temprature" in msg and "distill.training.lr" in msg


def test_a_missing_required_section_is_reported():
    data = demo_dict()
    del data["teacher"]
    msg = config_error(data)
    assert "teacher: required key is missing" in msg


def test_a_model_needs_exactly_one_source():
    data = demo_dict()
    data["student"]["pretrained"] = "gpt2"
    msg = config_error(data)
    assert "student" in msg and "exactly one of 'pretrained'" in msg


def test_jsonl_data_needs_a_train_path():
    data = demo_dict()
    data["data"] = {"source": "jsonl"}
    assert "data.train_path is not set" in config_error(data)


def test_a_top_level_that_is_not_a_mapping():
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config([1, 2], "x.yaml")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- consistency
def test_a_scratch_teacher_without_sft_is_refused():
    data = demo_dict()
    data["teacher_sft"]["enabled"] = False
    msg = config_error(data)
    assert "teacher_sft.enabled is false" in msg and "teacher.pretrained" in msg


def test_a_pretrained_teacher_may_skip_sft():
    data = demo_dict()
    data["teacher"] = {"pretrained": "some/teacher"}
    data["teacher_sft"]["enabled"] = False
    assert parse_config(data).teacher_sft.enabled is False


def test_same_vocabulary_kd_with_different_tokenizers_is_refused():
    data = demo_dict()  # bpe/1024 teacher, unigram/400 student
    data["distill"]["objective"]["kd_base"] = "forward_kl"
    msg = config_error(data)
    assert "distill.objective.kd_base 'forward_kl' needs one vocabulary" in msg
    assert "dskd, uld or mined" in msg


def test_same_vocabulary_kd_in_a_student_is_refused():
    data = demo_dict()
    data["distill"]["students"]["kl"] = {"objective": {"alpha": 0.5, "kd_base": "js", "ot": None}}
    assert "distill.students.kl.objective.kd_base 'js' needs one vocabulary" in config_error(data)


def test_same_vocabulary_kd_with_one_scratch_and_one_pretrained_is_refused():
    data = demo_dict()
    data["teacher"] = {"pretrained": "some/teacher"}
    data["distill"]["objective"]["kd_base"] = "reverse_kl"
    assert "needs one vocabulary" in config_error(data)


def test_same_vocabulary_kd_with_one_tokenizer_is_accepted():
    data = demo_dict()
    data["student"]["scratch"]["tokenizer"] = dict(data["teacher"]["scratch"]["tokenizer"])
    data["distill"]["objective"]["kd_base"] = "forward_kl"
    cfg = parse_config(data)
    assert cfg.distill.objective.kd_base == "forward_kl"
    assert cfg.needed_topk() > 0  # a logit-based KD base needs cached teacher logits


def test_a_prompt_budget_that_leaves_no_room_for_a_response_is_refused():
    data = demo_dict()
    data["tokenize"]["max_prompt_length"] = data["tokenize"]["max_length"]
    msg = config_error(data)
    assert "tokenize.max_prompt_length" in msg and "tokenize.max_length" in msg
    data = demo_dict()
    data["teacher_sft"]["training"]["max_length"] = 128  # below max_prompt_length 192
    assert "teacher_sft.training.max_length" in config_error(data)


# --------------------------------------------------------------------------- files
def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: demo\nteacher: {scratch: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "bad.yaml is not valid YAML" in str(info.value)
    assert "line" in str(info.value)  # PyYAML's position


def test_a_yaml_list_is_not_a_config(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path, ["generate.temperature=0.5"])


def test_an_empty_file_reports_the_missing_sections(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "teacher: required key is missing" in str(info.value)
    assert "student: required key is missing" in str(info.value)


# --------------------------------------------------------------------------- overrides
def test_overrides_set_nested_keys_with_yaml_types():
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        "generate.temperature=0.7",
        "evaluate.seeds=[7, 8]",
        "distill.objective.ot.cost=sq_euclidean",
        "distill.objective.ot.pairs={main: 1.0, cross_a: 0.5, cross_b: 0.0}",
        "teacher_sft.enabled=true",
        "evaluate.max_rows=null",
        "distill.training.lr=1.0e-3",
        "name = renamed",
    ])
    assert cfg.generate.temperature == 0.7
    assert cfg.evaluate.seeds == [7, 8]
    assert cfg.distill.objective.ot.cost == "sq_euclidean"
    assert cfg.distill.objective.ot.pairs == {"main": 1.0, "cross_a": 0.5, "cross_b": 0.0}
    assert cfg.evaluate.max_rows is None
    assert cfg.distill.training.lr == pytest.approx(1e-3)
    assert cfg.name == "renamed"


def test_an_override_creates_missing_and_null_sections():
    data = {"distill": {"objective": {"ot": None}}}
    apply_override(data, "distill.objective.ot.eps=0.05")
    apply_override(data, "cache_teacher.layers=[-1, 0]")
    assert data == {"distill": {"objective": {"ot": {"eps": 0.05}}},
                    "cache_teacher": {"layers": [-1, 0]}}


def test_an_override_can_null_a_section():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["distill.objective.ot=null"])
    assert cfg.distill.objective.ot is None


def test_a_typo_in_an_override_is_validated_like_the_file():
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "demo.yaml", ["generate.temprature=0.5"])
    msg = str(info.value)
    assert "did you mean 'generate.temperature'" in msg and "--set" in msg


@pytest.mark.parametrize("item, match", [
    ("generate.temperature", "must look like key.path=value"),
    ("generate..temperature=1", "empty key"),
    ("=1", "empty key"),
    ("name.x=1", "name is a value, not a section"),
    ("generate.seed=[1", "not valid YAML"),
])
def test_malformed_overrides(item, match):
    data = demo_dict()
    with pytest.raises(ConfigError, match=match):
        apply_override(data, item)


def test_overrides_do_not_touch_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text((REPO / "configs" / "demo.yaml").read_text())
    before = path.read_text()
    load_config(path, ["generate.temperature=0.3"])
    assert path.read_text() == before
    assert load_config(path).generate.temperature == 1.0


def test_extends_merges_a_config_over_another(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "grid.yaml").write_text(
        "extends: ../base.yaml\nname: grid\ndistill:\n  seeds: [1, 2]\n  objective: {alpha: 0.3}\n")
    (tmp_path / "base.yaml").write_text((REPO / "configs" / "demo.yaml").read_text())
    cfg = load_config(tmp_path / "sub" / "grid.yaml", ["distill.objective.kd_temperature=1.5"])
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.name == "grid" and cfg.training_seeds() == [1, 2]
    assert cfg.distill.objective.alpha == 0.3 and cfg.distill.objective.kd_temperature == 1.5
    assert cfg.distill.objective.ot == demo.distill.objective.ot  # merged, not replaced
    assert cfg.teacher == demo.teacher


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "c.yaml")


def test_a_students_derived_defaults_follow_its_own_settings():
    data = demo_dict()
    data["distill"]["students"] = {"uld": {"objective": {"kd_base": "uld"}},
                                   "uld_t3": {"objective": {"kd_base": "uld",
                                                            "kd_temperature": 3.0}},
                                   "last": {"objective": {"ot": {"layers": ["last"]}}}}
    st = {s.label: s.objective for s in parse_config(data).students()}
    assert st["cot2align"].kd_temperature == 2.0      # DSKD's own
    assert st["uld"].kd_temperature == 1.0            # ULD's own, not inherited from DSKD's
    assert st["uld_t3"].kd_temperature == 3.0         # written out: kept
    assert st["last"].ot.cross_layers == ["last"]     # the cross pairs follow the layers
