"""Checks of a validated config against the world, before Ray starts.

``learner.config`` checks the values themselves; what they point at (a model directory,
prompt files, scorer classes, a free port, the cluster's resources) is only found out
once the actors start, minutes later and buried in an actor's traceback. ``preflight``
looks at all of it in the driver, in a second, and raises one :class:`PreflightError`
whose message names each problem's config field (or ``file:line``) and the fix, ready to
be printed as it is.

No Ray here (it runs before ``ray.init``) and no model is built: a model is a directory
listing, a scorer is an import and a signature. ``check_cluster_resources`` is pure: it
takes the dict ``ray.cluster_resources()`` returns, so the caller owns the Ray call.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from learner.config import Config, ExternalRewardConfig
from learner.prompts import load_prompts, select_tags
from policy.pipeline import MODEL_INDEX, TINY_RANDOM, local_t5_tokenizer, looks_local, t5_overflow
from policy.sampler import check_resolution

BUILTIN_MODELS = (TINY_RANDOM,)  # names policy.pipeline.build_pipeline builds itself
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the hub spells ids
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of HF_HUB_OFFLINE
LEARNER_GPU = 1.0  # learner.engine.LearnerGroup: one GPU per rank when model.device is cuda
# The share of a custom resource each actor asks for (learner.service, actors.pool,
# learner.engine.LEARNER_RESOURCE_SHARE): mirrored here so that no Ray module is imported.
ROLLOUT_SHARE, REWARD_SHARE, LEARNER_SHARE = 0.01, 1.0, 0.01


class PreflightError(Exception):
    """What the config points at is missing or wrong; the message says what and how to fix
    it, one line per problem, to be printed without a traceback."""


def preflight(cfg: Config) -> None:
    """Check everything the run will need that can be checked without Ray or models.

    Every check runs, so one attempt reports every problem, not the first of several.
    """
    checks: list[Callable[[Config], None]] = [
        check_model, check_prompts, check_sequence_length, check_scorers, check_metrics_port]
    problems: list[str] = []  # one line each
    for check in checks:
        try:
            check(cfg)
        except PreflightError as e:
            problems += str(e).splitlines()
    if len(problems) == 1:
        raise PreflightError(problems[0])
    if problems:
        raise PreflightError("the run cannot start:\n" + "\n".join(f"  {p}" for p in problems))


# -- model ------------------------------------------------------------------------------


def check_model(cfg: Config) -> None:
    """``model.path`` is a builtin name, a diffusers directory, or a hub id that can load.

    Follows ``policy.pipeline.load_pipeline``'s own reading of the path (``looks_local``),
    so a typo under an existing folder is a missing directory here too, not a hub id.
    """
    path = cfg.model.path
    if path in BUILTIN_MODELS:
        return
    expected = (f"a diffusers pipeline directory holding {MODEL_INDEX}, a hub id "
                f"'org/name', or {' / '.join(BUILTIN_MODELS)}")
    if looks_local(path):
        local = Path(path).expanduser()
        if not local.is_dir():
            raise PreflightError(f"model.path {path!r}: no such directory; expected {expected}")
        if not (local / MODEL_INDEX).is_file():
            raise PreflightError(f"model.path {path!r}: the directory has no {MODEL_INDEX}; "
                                 f"expected {expected} (e.g. from pipe.save_pretrained)")
        if cfg.sampler.resolution is not None:
            check_local_resolution(local, cfg.sampler.resolution)
        return
    if not HUB_ID.match(path):
        raise PreflightError(f"model.path {path!r}: neither a local directory nor a hub id; "
                             f"expected {expected}")
    if _hub_offline() and not _in_hub_cache(path):
        raise PreflightError(
            f"model.path {path!r}: not a local directory, and as a hub id it cannot be "
            "downloaded: HF_HUB_OFFLINE is set and the hub cache does not hold it; unset "
            "HF_HUB_OFFLINE, download it first, or point model.path at a local directory "
            f"holding {MODEL_INDEX}")


def check_local_resolution(model_dir: Path, resolution: int) -> None:
    """``sampler.resolution`` against a local model's VAE and transformer configs (a hub
    model's are checked where it loads, in the actors)."""
    try:
        vae = json.loads((model_dir / "vae" / "config.json").read_text())
        transformer = json.loads((model_dir / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return  # an unusual layout: the loader will say what is wrong with it
    factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    try:
        check_resolution(resolution, factor, int(transformer.get("patch_size", 2)),
                         transformer.get("pos_embed_max_size"))
    except ValueError as e:
        raise PreflightError(f"{e}; model {model_dir}") from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE_VALUES


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local hub cache holds the pipeline's index (offline runs load from it)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, MODEL_INDEX)
    except Exception:  # noqa: BLE001 - an id the hub library refuses is not in the cache
        return False
    return isinstance(found, str)


# -- prompts ----------------------------------------------------------------------------


def check_prompts(cfg: Config) -> None:
    """The training prompts, and the evaluation prompts when the run evaluates, load.

    ``load_prompts`` names ``path:line`` itself; this only turns its errors into
    PreflightError (and reports both files when both are bad).
    """
    files = [("train.prompts", cfg.train.prompts)]
    if cfg.eval.every > 0:
        files.append(("eval.prompts", cfg.eval.prompts))
    problems = []
    for field, path in files:
        try:
            rows = load_prompts(path, field=field)
            if field == "train.prompts":
                select_tags(rows, cfg.train.tags, path)
        except (OSError, ValueError) as e:
            problems.append(f"{field}: {e}")
    if problems:
        raise PreflightError("\n".join(problems))


def check_sequence_length(cfg: Config) -> None:
    """No prompt is longer than the T5 slot (``model.max_sequence_length``) of a local
    model with a T5 encoder: diffusers would cut it short, with a warning per batch.
    (A hub model's tokenizer is not read here.)"""
    path = cfg.model.path
    if path in BUILTIN_MODELS or not looks_local(path):
        return
    try:
        tokenizer = local_t5_tokenizer(path)
        rows = load_prompts(cfg.train.prompts, field="train.prompts")
        if cfg.eval.every > 0:
            rows += load_prompts(cfg.eval.prompts, field="eval.prompts")
    except (OSError, ValueError):
        return  # check_model / check_prompts report these
    n = cfg.model.max_sequence_length
    over = t5_overflow(tokenizer, [r["prompt"] for r in rows], n)
    if over is not None:
        raise PreflightError(
            f"model.max_sequence_length {n}: {over.count} prompt(s) are longer than the T5 "
            f"slot and would reach the T5 encoder cut short (the longest, {over.longest!r}, "
            f"is {over.tokens} tokens with EOS); set model.max_sequence_length >= {over.tokens}")


# -- external rewards -------------------------------------------------------------------


def check_scorers(cfg: Config) -> None:
    """Every kind-actor reward's ``target`` imports and takes its ``kwargs``.

    ``actors.reward.ExternalRewardWorker`` builds the scorer as ``Class(**kwargs)``
    (``rewards.wire.import_scorer``), with nothing else, so the kwargs must bind to the
    constructor on their own. The scorer is not built: that may load a model.
    """
    problems = []
    for i, reward in enumerate(cfg.external_rewards):
        if reward.kind != "actor":
            continue
        try:
            _check_scorer(reward)
        except PreflightError as e:
            problems.append(f"external_rewards[{i}] {reward.name!r}: {e}")
    if problems:
        raise PreflightError("\n".join(problems))


def _check_scorer(reward: ExternalRewardConfig) -> None:
    target = reward.target or ""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PreflightError(f"target {target!r} must look like 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - whatever the module raises, it does not import
        why = (str(e).splitlines() or [""])[0]
        raise PreflightError(f"target {target!r}: module {module_name!r} does not import "
                             f"({type(e).__name__}: {why}); fix its target or install what "
                             "the module needs") from None
    if not hasattr(module, attr):
        raise PreflightError(f"target {target!r}: module {module_name!r} has no attribute "
                             f"{attr!r}; fix its target")
    scorer = getattr(module, attr)
    if not callable(scorer):
        raise PreflightError(f"target {target!r} is a {type(scorer).__name__}, not a class")
    try:
        signature = inspect.signature(scorer)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    try:
        signature.bind(**reward.kwargs)
    except TypeError as e:
        raise PreflightError(f"kwargs {reward.kwargs} do not fit {target}{_plain(signature)}: "
                             f"{e}; fix its kwargs") from None


def _plain(signature: inspect.Signature) -> str:
    """``(a, b=1)``: the parameters without annotations, which are noise in a message."""
    params = [p.replace(annotation=p.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=params, return_annotation=signature.empty))


# -- metrics port -----------------------------------------------------------------------


def check_metrics_port(cfg: Config) -> None:
    """``metrics.port`` can be bound on ``metrics.host``, as the endpoint will bind it.

    Binds the way prometheus-client's server does (the address family of
    ``getaddrinfo(host)``, SO_REUSEADDR) and lets go at once.
    """
    host, port = cfg.metrics.host, cfg.metrics.port
    if port == 0:
        return
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise PreflightError(f"metrics.host {host!r} does not resolve ({e.strerror}); set "
                             "metrics.host to 127.0.0.1, or 0.0.0.0 for cluster scraping"
                             ) from None
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise PreflightError(_port_problem(host, port, e)) from None


def _port_problem(host: str, port: int, e: OSError) -> str:
    off = "or metrics.port=0 to turn the endpoint off"
    if e.errno == errno.EADDRINUSE:
        return (f"metrics.port {port} is already in use on {host}; set another port "
                f"(--set metrics.port={port + 1 if port < 65535 else 8000}) {off}")
    if e.errno == errno.EADDRNOTAVAIL:
        return (f"metrics.host {host!r} is not an address of this machine; set metrics.host "
                "to 127.0.0.1, or 0.0.0.0 for cluster scraping")
    if e.errno == errno.EACCES:
        return (f"metrics.port {port}: binding it on {host} is not permitted (ports under "
                f"1024 need privileges); set a port from 1024 up {off}")
    return f"metrics.port {port} on {host}: cannot bind ({e.strerror}); set another port {off}"


# -- cluster resources ------------------------------------------------------------------


@dataclass(frozen=True)
class Demand:
    """``count`` actors of one kind, each asking for ``each`` of a resource."""

    who: str  # e.g. "rollout"
    count: int
    each: float
    field: str  # the config field to lower, e.g. "rollout.num_gpus"

    @property
    def total(self) -> float:
        return self.count * self.each


def check_cluster_resources(cfg: Config, cluster_resources: dict[str, float]) -> None:
    """The cluster holds, in total, the CPUs, GPUs and custom resources the actors ask for.

    An actor that asks for what no node has pends for ever, silently; this turns that into
    an error at start. ``cluster_resources`` is what ``ray.cluster_resources()`` returns.
    The totals are a necessary condition, not a placement plan (an actor still needs one
    node with all it asks for). With ``ray.autoscaling`` the cluster adds nodes on demand,
    so what is missing now is no error and nothing is checked.
    """
    if cfg.ray.autoscaling:
        return
    problems = []
    for resource, demands in resource_demands(cfg, cluster_resources).items():
        asked = sum(d.total for d in demands)
        have = float(cluster_resources.get(resource, 0.0))
        if asked > have + 1e-9:
            problems.append(_shortage(resource, demands, asked, have))
    if len(problems) == 1:
        raise PreflightError(f"the Ray cluster is too small for this config: {problems[0]}")
    if problems:
        raise PreflightError("the Ray cluster is too small for this config:\n"
                             + "\n".join(f"  {p}" for p in problems))


def resource_demands(cfg: Config, cluster_resources: dict[str, float]) -> dict[str, list[Demand]]:
    """What the run's actors ask for, by resource, as ``learner.service`` creates them.

    Custom resources follow the actors' own rule: asked for when ``require_resource`` is
    set or when the cluster declares the resource (external rewards never require it).
    """
    declared = {name for name, amount in cluster_resources.items() if amount > 0}
    out: dict[str, list[Demand]] = {}

    def ask(resource: str, demand: Demand) -> None:
        if demand.total > 0:
            out.setdefault(resource, []).append(demand)

    ro, rp, lr = cfg.rollout, cfg.reward_pool, cfg.learner
    ask("CPU", Demand("rollout", ro.num_actors, ro.num_cpus, "rollout.num_cpus"))
    ask("GPU", Demand("rollout", ro.num_actors, ro.num_gpus, "rollout.num_gpus"))
    if ro.require_resource or "rollout" in declared:
        ask("rollout", Demand("rollout", ro.num_actors, ROLLOUT_SHARE, "rollout.num_actors"))
    if cfg.self_confidence.enabled:
        ask("CPU", Demand("reward_pool", rp.num_actors, rp.num_cpus, "reward_pool.num_cpus"))
        ask("GPU", Demand("reward_pool", rp.num_actors, rp.num_gpus, "reward_pool.num_gpus"))
        if rp.require_resource or "reward" in declared:
            ask("reward", Demand("reward_pool", rp.num_actors, REWARD_SHARE,
                                 "reward_pool.num_actors"))
    for i, ext in enumerate(cfg.external_rewards):
        who, field = f"reward {ext.name!r}", f"external_rewards[{i}]"
        ask("CPU", Demand(who, ext.num_actors, ext.num_cpus, f"{field}.num_cpus"))
        ask("GPU", Demand(who, ext.num_actors, ext.num_gpus, f"{field}.num_gpus"))
        if "reward" in declared:
            ask("reward", Demand(who, ext.num_actors, REWARD_SHARE, f"{field}.num_actors"))
    gpu = LEARNER_GPU if cfg.model.device.startswith("cuda") else 0.0
    ask("CPU", Demand("learner", lr.num_ranks, lr.num_cpus, "learner.num_cpus"))
    ask("GPU", Demand("learner", lr.num_ranks, gpu, "learner.num_ranks (or model.device=cpu)"))
    if lr.require_resource or "learner" in declared:
        ask("learner", Demand("learner", lr.num_ranks, LEARNER_SHARE, "learner.num_ranks"))
    return out


def _shortage(resource: str, demands: list[Demand], asked: float, have: float) -> str:
    """One line: how much of ``resource`` is asked for, by whom, what there is, the fix."""
    parts = ", ".join(f"{d.who} {d.count} x {d.each:g}" for d in demands)
    lower = ", ".join(dict.fromkeys(d.field for d in demands))
    line = f"{resource}: {asked:g} asked ({parts}), the cluster has {have:g}; "
    if resource == "CPU":
        return line + (f"lower {lower}, or give Ray more CPUs (ray.num_cpus for a local "
                       "instance, a bigger cluster with ray.address / --address)")
    if resource == "GPU":
        return line + f"lower {lower}, or join a cluster with GPUs (ray.address / --address)"
    section = {"rollout": "rollout", "reward": "reward_pool", "learner": "learner"}[resource]
    fix = (f"start nodes with ray start --resources='{{\"{resource}\": N}}', or lower {lower}")
    if have == 0:
        fix += (f", or set {section}.require_resource=false to place them by CPU/GPU alone "
                "(ray.autoscaling=true if an autoscaler starts such nodes on demand)")
    return line + fix
