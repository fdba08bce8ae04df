"""Every shipped preset loads; bad fields and values fail naming the field."""

from pathlib import Path

import pytest

from learner.config import Config, ConfigError, load_config
from policy.pretrain import load_pretrain_config

PRESETS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


def test_there_are_presets():
    assert {p.name for p in PRESETS} >= {"tiny_solace.yaml", "sd35m_solace.yaml"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(path):
    if path.name.startswith("pretrain_"):  # recipes of policy.pretrain, not RL runs
        assert load_pretrain_config(path).steps > 0
        return
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    cfg.sampler.spec().window()  # the sampler spec it defines is usable


def test_paper_preset_holds_the_paper_numbers():
    cfg = load_config(Path("configs/sd35m_solace.yaml"))
    assert (cfg.grpo.group_size, cfg.self_confidence.num_probes, cfg.lora.rank) == (16, 8, 32)
    assert (cfg.grpo.beta, cfg.grpo.clip_range, cfg.sampler.noise_level) == (0.04, 1e-4, 0.7)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["grpo.beta=0.1", "sampler.sde_window=[2, 5]", "model.path=x/y"])
    assert cfg.grpo.beta == 0.1 and cfg.sampler.sde_window == (2, 5) and cfg.model.path == "x/y"


@pytest.mark.parametrize(
    "override, field",
    [
        ("grpo.bogus=1", "grpo.bogus"),
        ("grpo.group_size=1", "grpo.group_size"),
        ("self_confidence.num_probes=7", "num_probes"),
        ("sampler.sde_window=[5, 3]", "sampler.sde_window"),
        ("sampler.sde_type=ddim", "sampler.sde_type"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["grpo.beta"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")
