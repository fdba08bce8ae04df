"""Every shipped preset loads; bad fields and values fail naming the field."""

import re
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


# -- values the fields must refuse ----------------------------------------------------------


def _float_fields(model, prefix=""):
    """Dotted names of every float field of the tree (external rewards' through a list)."""
    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _float_fields(kind, f"{prefix}{name}.")
        elif kind is float:
            yield f"{prefix}{name}"


FLOATS = sorted(_float_fields(Config))


def test_there_are_float_fields_to_check():
    assert {"grpo.lr", "sampler.noise_level", "self_confidence.weight"} <= set(FLOATS)


@pytest.mark.parametrize("field", FLOATS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_no_float_field_takes_nan_or_infinity(field, value):
    with pytest.raises(ConfigError, match=re.escape(field) + ": .*finite number"):
        load_config(None, [f"{field}={value}"])


def test_an_external_reward_weight_takes_no_nan():
    with pytest.raises(ConfigError, match=r"external_rewards\.0\.weight: .*finite"):
        load_config(None, ['external_rewards=[{name: s, target: "a:B", weight: .nan}]'])


@pytest.mark.parametrize(
    "override, field",
    [("seed=-1", "seed"), ("eval.seed=-1", "eval.seed"), ("train.steps=0", "train.steps"),
     ("rollout.timeout_s=0", "rollout.timeout_s"), ("rollout.num_cpus=-1", "rollout.num_cpus"),
     ("reward_pool.max_retries=-1", "reward_pool.max_retries"), ("metrics.port=-1", "metrics.port"),
     ("metrics.host=''", "metrics.host"), ("model.path=''", "model.path")],
)
def test_negative_counts_seeds_and_empty_names_are_refused(override, field):
    with pytest.raises(ConfigError, match=re.escape(field) + ": "):
        load_config(None, [override])


def test_metrics_host_is_local_by_default_and_the_cluster_preset_exposes_it():
    assert load_config(None).metrics.host == "127.0.0.1"
    assert load_config("configs/sd35m_solace.yaml").metrics.host == "0.0.0.0"


# -- where a bad value came from ------------------------------------------------------------


TINY = "configs/tiny_solace.yaml"


def test_a_bad_override_is_reported_as_the_override_not_the_file():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["grpo.group_size=1"])
    message = str(info.value)
    assert "grpo.group_size" in message and "got 1" in message
    assert "from --set grpo.group_size=1" in message and TINY not in message


def test_a_bad_value_in_the_file_is_reported_in_the_file(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("grpo:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"grpo\.lr: .*\(in " + re.escape(str(path)) + r"\)$"):
        load_config(path, ["train.steps=3"])


def test_one_problem_is_one_line_and_several_are_one_line_each():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["seed=-1"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["seed=-1", "grpo.lr=0"])
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid configuration:" and len(lines) == 3


def test_an_unknown_field_lists_the_fields_of_its_section():
    with pytest.raises(ConfigError, match=r"grpo\.lrr: unknown field; the fields here are .*\blr\b"):
        load_config(None, ["grpo.lrr=1"])


def test_an_override_that_is_not_yaml_names_the_override():
    with pytest.raises(ConfigError, match=r"^--set sampler\.sde_window=\[2, : the value is not valid YAML"):
        load_config(TINY, ["sampler.sde_window=[2, "])


def test_an_override_into_a_value_names_the_override():
    with pytest.raises(ConfigError, match=r"--set seed\.x=1: seed is not a section"):
        load_config(TINY, ["seed.x=1"])


# -- a config file that is not YAML ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, where, what",
    [
        ("seed: 0\ngrpo:\n  lr: 3.0e-4\n   beta: 0.1\n", ":4:8:", "mapping values are not allowed"),
        ("seed: 0\ngrpo: {lr: 1\n", ":3:1:", "expected ',' or '}'"),
        ("seed: 0\nx: \"a\x01\"\n", ":2:6:", "not allowed"),
    ],
    ids=["indent", "unclosed", "control-character"],
)
def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, text, where, what):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}{where} not valid YAML" in message and what in message and "\n" not in message


def test_a_config_file_that_is_not_utf8_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"seed: 0\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2:6: not UTF-8")):
        load_config(path)


def test_a_config_file_that_is_not_a_mapping_says_so(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        load_config(path)
