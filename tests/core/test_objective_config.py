"""The objective's config sections: defaults written once, per-base KD temperatures, checks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cot2align_core import ot
from cot2align_core.config import (KD_BASES, KD_TEMPERATURES, SAME_VOCAB_KD_BASES, ConfigError,
                                   ObjectiveConfig, OTConfig, load_config, parse_config)
from cot2align_core.losses import KD_KINDS

REPO = Path(__file__).resolve().parents[2]


def test_kd_temperature_defaults_to_the_bases_own():
    assert ObjectiveConfig(kd_base="uld").kd_temperature == 1.0
    assert ObjectiveConfig(kd_base="dskd").kd_temperature == 2.0
    assert ObjectiveConfig().kd_temperature == KD_TEMPERATURES[ObjectiveConfig().kd_base]
    assert set(KD_TEMPERATURES) == set(KD_BASES)
    # An explicit value wins, and the resolved value is what is dumped (and fingerprinted).
    assert ObjectiveConfig(kd_base="uld", kd_temperature=3.0).kd_temperature == 3.0
    dumped = ObjectiveConfig(kd_base="uld").model_dump()
    assert dumped["kd_temperature"] == 1.0
    assert ObjectiveConfig.model_validate(dumped) == ObjectiveConfig(kd_base="uld")


def test_kd_settings_are_settable_and_checked():
    c = ObjectiveConfig(skew=0.3, dskd_divergence="js")
    assert (c.skew, c.dskd_divergence) == (0.3, "js")
    for bad in ({"skew": 1.5}, {"dskd_divergence": "kl"}, {"kd_temperature": 0.0},
                {"kd_base": "kl"}):
        with pytest.raises(ValueError):
            ObjectiveConfig(**bad)
    with pytest.raises(ValueError) as err:
        ObjectiveConfig(kd_base="kl")
    assert "kd_temperature" not in str(err.value)  # only the real mistake is reported


def test_derived_properties():
    assert ObjectiveConfig().uses_kd and ObjectiveConfig().uses_ot
    assert not ObjectiveConfig(alpha=0.0).uses_kd and not ObjectiveConfig(alpha=0.0).uses_ot
    assert not ObjectiveConfig(ot=None).uses_ot
    assert not ObjectiveConfig(ot=OTConfig(weight=0.0)).uses_ot
    assert not ObjectiveConfig(ot=OTConfig(pairs={"main": 0.0})).uses_ot
    assert not ObjectiveConfig(kd_base="none").uses_kd
    assert ObjectiveConfig(kd_base="js").same_vocabulary
    assert not ObjectiveConfig(kd_base="uld").same_vocabulary
    assert KD_KINDS == SAME_VOCAB_KD_BASES  # one definition


def test_ot_defaults_are_real_values_and_agree_with_the_solver():
    c = OTConfig()
    assert (c.cost, c.eps, c.tol) == (ot.DEFAULT_COST, ot.DEFAULT_EPS, ot.DEFAULT_TOL)
    # Training caps Sinkhorn at the authors' 100 iterations (the solver's own default, for
    # one-off exact plans, is higher): a batch waits for its slowest problem.
    assert c.max_iter == 100 < ot.DEFAULT_MAX_ITER
    assert None not in c.model_dump().values()
    assert c.space == "teacher" and c.layer_weighting == "fixed"


def test_ot_layers():
    assert OTConfig(layers=["embedding", 0.5, "last"]).layers == ["embedding", 0.5, "last"]
    for bad in ([], ["last", "last"], [1.0], [0.0], ["middle"]):
        with pytest.raises(ValueError):
            OTConfig(layers=bad)
    with pytest.raises(ValueError):
        OTConfig(pairs={"main": -1.0})


def test_yaml_objective_and_errors_name_the_key(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      ["distill.objective.ot.layers=[embedding, 0.5, last]",
                       "distill.objective.kd_base=uld"])
    assert cfg.distill.objective.ot.layers == ["embedding", 0.5, "last"]
    assert cfg.distill.objective.kd_temperature == 1.0
    with pytest.raises(ConfigError, match="distill.objective.ot.space"):
        load_config(REPO / "configs" / "demo.yaml", ["distill.objective.ot.space=both"])
    assert parse_config({"teacher": {"pretrained": "t"}, "student": {"pretrained": "s"}}
                        ).data.cot_requires_input  # the paper's default


def test_config_module_does_not_import_torch():
    code = "import sys, cot2align_core.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
