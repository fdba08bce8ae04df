"""learner.preflight: what a config points at is checked before Ray starts, each problem
named by its field (or file:line) with the fix. No Ray, no models."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from learner.config import load_config
from learner.preflight import PreflightError, check_cluster_resources, preflight

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in ROOT.glob("configs/*.yaml") if not p.name.startswith("pretrain_"))
OFF = "metrics.port=0"  # port 8000 may be taken on a shared machine


def fails(overrides, *expected):
    """preflight on the defaults plus ``overrides`` fails with every ``expected`` text."""
    with pytest.raises(PreflightError) as info:
        preflight(load_config(None, [OFF, *overrides]))
    message = str(info.value)
    for text in expected:
        assert text in message, message
    return message


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_passes(path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # sd35m names a hub id
    preflight(load_config(path, [OFF]))


def test_preflight_imports_no_ray():
    code = "import sys, learner.preflight; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# -- model.path ---------------------------------------------------------------------------


def test_a_missing_model_directory_is_named(tmp_path):
    fails([f"model.path={tmp_path / 'nope'}"], "model.path", "nope", "no such directory",
          "model_index.json")


def test_a_directory_without_model_index_is_named(tmp_path):
    fails([f"model.path={tmp_path}"], "model.path", str(tmp_path), "has no model_index.json")


def test_a_diffusers_directory_and_the_builtin_pass(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    preflight(load_config(None, [OFF, f"model.path={tmp_path}"]))
    preflight(load_config(None, [OFF, "model.path=tiny-random"]))


def test_a_t5_slot_shorter_than_the_prompts_is_named_with_the_length_to_set(tmp_path):
    from policy.tiny import DEFAULT_VOCABULARY, build_t5_tokenizer

    (tmp_path / "model_index.json").write_text("{}")
    build_t5_tokenizer(DEFAULT_VOCABULARY).save_pretrained(tmp_path / "tokenizer_3")
    message = fails([f"model.path={tmp_path}", "model.max_sequence_length=8"],
                    "model.max_sequence_length 8", "cut short", "set model.max_sequence_length >= ")
    needed = int(message.rsplit(">= ", 1)[1])
    preflight(load_config(None, [OFF, f"model.path={tmp_path}",
                                 f"model.max_sequence_length={needed}"]))


def test_a_hub_id_passes_online_and_fails_offline_unless_cached(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    preflight(load_config(None, [OFF, "model.path=nobody-here/no-such-model"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(["model.path=nobody-here/no-such-model"], "model.path", "nobody-here/no-such-model",
          "HF_HUB_OFFLINE")


def test_a_string_that_is_neither_path_nor_hub_id_is_named(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fails(["model.path='no body/x y'"], "model.path", "neither a local directory nor a hub id")


# -- prompt files -------------------------------------------------------------------------


def write(path, text: bytes | str):
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return path


ROW = json.dumps({"prompt": "a red cube", "tag": "color_attr"})


@pytest.mark.parametrize(
    "content, where, what",
    [
        (f"{ROW}\n{ROW}\n{{oops\n", ":3:", "not valid JSON"),
        (f"{ROW}\n[1, 2]\n", ":2:", "'prompt' string"),
        (f'{ROW}\n{{"text": "x"}}\n', ":2:", "'prompt' string"),
        ("\n\n", "", "holds no prompts"),
        (ROW.encode() + b"\n" + b'{"prompt": "caf\xe9"}\n', ":2:", "not UTF-8"),
    ],
    ids=["json", "not-object", "no-prompt", "empty", "latin-1"],
)
def test_a_bad_train_prompt_file_names_file_and_line(tmp_path, content, where, what):
    path = write(tmp_path / "p.jsonl", content)
    fails([f"train.prompts={path}"], "train.prompts", f"{path}{where}", what)


def test_a_non_utf8_byte_is_reported_at_its_line_and_column_by_load_prompts(tmp_path):
    from learner.prompts import load_prompts

    path = write(tmp_path / "p.jsonl", ROW.encode() + b"\n\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:3:16: not UTF-8 \(byte 0xe9\)"):
        load_prompts(path)


def test_load_prompts_keeps_line_numbers_past_unicode_line_separators_and_a_bom(tmp_path):
    from learner.prompts import load_prompts

    tricky = json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False)
    path = write(tmp_path / "p.jsonl", b"\xef\xbb\xbf" + f"{ROW}\n{tricky}\nnope\n".encode())
    with pytest.raises(ValueError, match=r"p\.jsonl:3: not valid JSON"):
        load_prompts(path)
    path.write_bytes(b"\xef\xbb\xbf" + f"{ROW}\n{tricky}\n".encode())
    assert [r["prompt"] for r in load_prompts(path)] == ["a red cube", "a\u2028b"]


def test_a_missing_prompt_file_names_the_field(tmp_path):
    fails([f"train.prompts={tmp_path / 'nope.jsonl'}"], "train.prompts", "nope.jsonl", "not found")


def test_a_train_tag_the_file_lacks_is_found_before_ray(tmp_path):
    path = write(tmp_path / "p.jsonl", f"{ROW}\n")
    fails([f"train.prompts={path}", "train.tags=[color_attr, counting]"], "train.tags",
          "['counting']", "its tags are ['color_attr']")


def test_eval_prompts_are_checked_only_when_the_run_evaluates(tmp_path):
    missing = tmp_path / "test.jsonl"
    preflight(load_config(None, [OFF, "eval.every=0", f"eval.prompts={missing}"]))
    fails(["eval.every=5", f"eval.prompts={missing}"], "eval.prompts", "test.jsonl", "not found")


# -- external rewards ---------------------------------------------------------------------


SCORERS = '''
class Needs:
    def __init__(self, head, scale=1.0):
        self.head = head

NOT_A_CLASS = 3
'''


def reward(target, kwargs="{}"):
    return f"external_rewards=[{{name: r, target: '{target}', kwargs: {kwargs}}}]"


@pytest.fixture
def scorers(tmp_path, monkeypatch):
    write(tmp_path / "fake_scorers_for_preflight.py", SCORERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fake_scorers_for_preflight"


def test_a_scorer_that_fits_passes(scorers):
    preflight(load_config(None, [OFF, reward(f"{scorers}:Needs", "{head: h}")]))
    preflight(load_config(None, [OFF, reward("rewards.shapes:ShapesReward",
                                             "{position_threshold: 0.2}")]))


@pytest.mark.parametrize(
    "target, kwargs, expected",
    [
        ("no_such_module_here:X", "{}", ["module 'no_such_module_here' does not import",
                                         "ModuleNotFoundError"]),
        ("{m}:Nope", "{}", ["has no attribute 'Nope'"]),
        ("{m}:NOT_A_CLASS", "{}", ["not a class"]),
        ("{m}:Needs", "{}", ["do not fit", "(head, scale=1.0)", "missing a required argument: 'head'"]),
        ("{m}:Needs", "{head: h, bogus: 1}", ["unexpected keyword argument 'bogus'"]),
    ],
    ids=["module", "attribute", "not-callable", "missing-kwarg", "extra-kwarg"],
)
def test_a_bad_scorer_is_named_with_the_reward(scorers, target, kwargs, expected):
    fails([reward(target.format(m=scorers), kwargs)], "external_rewards[0] 'r'", *expected)


def test_http_rewards_are_not_imported():
    url = 'external_rewards=[{name: s, kind: http, url: "http://127.0.0.1:1"}]'
    preflight(load_config(None, [OFF, url]))


# -- metrics.port -------------------------------------------------------------------------


def test_a_taken_metrics_port_is_named_with_the_fix():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PreflightError) as info:
            preflight(load_config(None, [f"metrics.port={port}"]))
    message = str(info.value)
    assert f"metrics.port {port} is already in use on 127.0.0.1" in message
    assert "metrics.port=0" in message


def test_a_free_metrics_port_passes_and_a_foreign_host_is_named():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    preflight(load_config(None, [f"metrics.port={port}"]))
    fails([f"metrics.port={port}", "metrics.host=203.0.113.5"], "metrics.host '203.0.113.5'",
          "not an address of this machine")


def test_every_problem_is_reported_at_once(tmp_path):
    message = fails([f"model.path={tmp_path / 'm'}", f"train.prompts={tmp_path / 'p.jsonl'}"],
                    "the run cannot start:", "model.path", "train.prompts")
    assert all(line.startswith("  ") for line in message.splitlines()[1:])


# -- cluster resources --------------------------------------------------------------------


def shortage(overrides, cluster):
    with pytest.raises(PreflightError) as info:
        check_cluster_resources(load_config(None, overrides), cluster)
    return str(info.value)


def test_the_defaults_fit_a_three_cpu_cluster():
    check_cluster_resources(load_config(None), {"CPU": 3.0, "memory": 1e9})


def test_missing_cpus_and_gpus_are_named_with_the_fields_to_lower():
    message = shortage(["rollout.num_gpus=1", "rollout.num_actors=2"], {"CPU": 3.0})
    assert "CPU: 4 asked" in message and "the cluster has 3" in message
    assert "GPU: 2 asked (rollout 2 x 1)" in message and "rollout.num_gpus" in message
    message = shortage(["model.device=cuda", "learner.num_ranks=2"], {"CPU": 8.0, "GPU": 1.0})
    assert "GPU: 2 asked (learner 2 x 1)" in message and "model.device=cpu" in message


def test_a_required_custom_resource_no_node_declares_is_named():
    message = shortage(["rollout.require_resource=true"], {"CPU": 8.0})
    assert "rollout: 0.01 asked" in message and "--resources" in message
    assert "rollout.require_resource=false" in message and "ray.autoscaling=true" in message


def test_a_declared_custom_resource_too_small_for_the_pool_is_named():
    message = shortage(["reward_pool.num_actors=3"], {"CPU": 8.0, "reward": 2.0})
    assert "reward: 3 asked (reward_pool 3 x 1), the cluster has 2" in message
    check_cluster_resources(load_config(None, ["reward_pool.num_actors=2"]),
                            {"CPU": 8.0, "reward": 2.0})


def test_an_autoscaling_cluster_is_not_checked():
    cfg = load_config(ROOT / "configs/sd35m_solace.yaml")
    assert cfg.ray.autoscaling
    check_cluster_resources(cfg, {"CPU": 0.0})  # the head alone, before any GPU node
    with pytest.raises(PreflightError, match="GPU: 16 asked"):
        check_cluster_resources(load_config(ROOT / "configs/sd35m_solace.yaml",
                                            ["ray.autoscaling=false"]), {"CPU": 0.0})


def test_the_metrics_endpoint_binds_metrics_host_and_preflight_sees_it_taken():
    import urllib.request

    from learner.metrics import PrometheusMetrics

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = load_config(None, [f"metrics.port={port}"])
    served = PrometheusMetrics(cfg.metrics.port, ["self_confidence"], host=cfg.metrics.host)
    try:
        server, _ = served.server
        assert server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert b"solace_steps" in answer.read()
        with pytest.raises(PreflightError, match=f"metrics.port {port} is already in use"):
            preflight(cfg)
    finally:
        served.server[0].shutdown()
        served.server[0].server_close()


def test_two_bad_prompt_files_are_two_indented_lines(tmp_path):
    message = fails(["eval.every=1", f"train.prompts={tmp_path / 'a.jsonl'}",
                     f"eval.prompts={tmp_path / 'b.jsonl'}"], "the run cannot start:")
    lines = message.splitlines()
    assert len(lines) == 3 and lines[1].startswith("  train.prompts: ")
    assert lines[2].startswith("  eval.prompts: ")
