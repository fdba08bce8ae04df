"""Every shipped preset loads; bad fields and values fail naming the field."""

from pathlib import Path

import pytest
import yaml

from learner.config import Config, ConfigError, load_config
from shapes.pretrain import load_pretrain_config

PRESETS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


def test_there_are_presets():
    assert {p.name for p in PRESETS} >= {"tiny_solace.yaml", "sd35m_solace.yaml"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(path):
    if path.name.startswith("pretrain_"):  # recipes of shapes.pretrain, not RL runs
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


HTTP = 'external_rewards=[{name: shapes, kind: http, url: "http://127.0.0.1:8765"%s}]'


def test_an_http_reward_gets_the_client_defaults_and_stops_on_failure_by_default():
    reward = load_config(None, [HTTP % ""]).external_rewards[0]
    assert (reward.kind, reward.target, reward.token_env) == ("http", None, "SOLACE_REWARD_TOKEN")
    assert reward.on_failure == "stop" and reward.verify_tls is True
    assert reward.http_kwargs()["url"] == "http://127.0.0.1:8765"


@pytest.mark.parametrize(
    "override, message",
    [
        ('external_rewards=[{name: s, kind: http}]', "kind 'http' needs url"),
        ('external_rewards=[{name: s, kind: http, url: "127.0.0.1:8765"}]', "kind 'http' needs url"),
        ('external_rewards=[{name: s}]', "kind 'actor' needs target"),
        ('external_rewards=[{name: s, target: "a:B", url: "http://h:1"}]', "url only applies to kind http"),
        (HTTP % ', target: "a:B"', "target only applies to kind actor"),
        (HTTP % ", on_failure: retry", "on_failure"),
        (HTTP % ", bogus: 1", "bogus"),
        (HTTP % ", timeout_s: 100", "must be under reward_pool.timeout_s"),
    ],
)
def test_bad_external_rewards_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_run_needs_a_reward_that_trains():
    with pytest.raises(ConfigError, match="no reward to train on"):
        load_config(None, ["self_confidence.enabled=false"])
    shapes = '[{name: s, target: "a:B", weight: 0.0}]'
    with pytest.raises(ConfigError, match="no reward to train on"):
        load_config(None, ["self_confidence.enabled=false", f"external_rewards={shapes}"])
    load_config(None, ["self_confidence.enabled=false", f"external_rewards={shapes.replace('0.0', '1.0')}"])


def test_a_saved_config_with_an_actor_reward_loads_again(tmp_path):
    # config.yaml of a run holds every field, http ones at their defaults included.
    cfg = load_config(None, ['external_rewards=[{name: s, target: "a:B"}]'])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(path) == cfg
