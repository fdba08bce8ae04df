"""The one configuration tree: every number that defines the algorithm, with its meaning.

Presets are YAML files in ``configs/`` holding values only; ``key.sub=value`` overrides
from the command line are applied on top. Unknown keys and bad values fail here, before
anything is built, with the dotted field name in the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from learner.prompts import read_utf8
from policy.pipeline import LoraSpec
from policy.sampler import SamplerSpec

SC = "self_confidence"  # the name of SOLACE's reward in metrics and samples.jsonl
HTTP_SCORER = "rewards.http:HttpScorer"  # the scorer of kind-http external rewards


class _Section(BaseModel):
    """Every section: unknown keys fail, values are frozen, and no float field takes NaN or
    an infinity (YAML reads ``.nan`` and ``.inf``; a NaN learning rate or weight would only
    show up as NaN losses many minutes into the run)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Section):
    path: str = Field(
        "tiny-random", min_length=1,
        description="diffusers directory or hub id of an SD3 pipeline; 'tiny-random' builds "
        "the offline tiny random-weight pipeline of policy.tiny",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the transformer weights (latents and log-probs stay fp32)"
    )
    device: str = Field("cpu", min_length=1, description="torch device for the models, e.g. 'cpu' or 'cuda'")
    max_sequence_length: int = Field(
        8, ge=1, description="T5 token slots of the joint text sequence (zeros when no T5 encoder)"
    )
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default")
    prompt_table: bool = Field(
        False, description="encode every training and evaluation prompt once, in a short-lived "
        "actor before the run, and give the rollout, reward and learner actors the table "
        "through the object store: they then load no text encoder (SD3's three are ~10 GB "
        "in bf16; learner.sequential keeps its own). The table holds prompts x (77 + "
        "max_sequence_length) x joint width values in the model's dtype: 2.7 MB a prompt "
        "for SD3 in bf16 at 256 T5 slots")
    prompt_table_max_gib: float = Field(
        8.0, gt=0, description="largest prompt table to build; a larger one is "
        "refused before any other actor starts")


class LoraConfig(_Section):
    rank: int = Field(32, ge=1, description="LoRA rank r")
    alpha: float = Field(64.0, gt=0, description="LoRA alpha (scale alpha / r)")
    init: Literal["gaussian", "kaiming"] = Field(
        "gaussian", description="init of A (B starts at 0): normal with std 1/r, as Flow-GRPO "
        "and SOLACE use (peft's 'gaussian'), or peft's default kaiming-uniform"
    )
    target_modules: tuple[str, ...] = Field(
        LoraSpec().target_modules, description="transformer modules that get a LoRA adapter"
    )

    def spec(self, seed: int) -> LoraSpec:
        return LoraSpec(self.rank, self.alpha, self.target_modules, init_seed=seed,
                        init=self.init)


class SamplerConfig(_Section):
    num_steps: int = Field(10, ge=2, description="denoising steps T of training rollouts")
    eval_num_steps: int = Field(40, ge=2, description="denoising steps of evaluation samples")
    guidance_scale: float = Field(4.5, ge=1.0, description="CFG scale w (1 disables CFG)")
    noise_level: float = Field(0.7, gt=0.0, le=1.0, description="SDE noise level a")
    sde_type: Literal["sde", "cps"] = Field("sde", description="stochastic step of docs/design.md §4")
    sde_window: tuple[int, int] | None = Field(
        None, description="[start, stop) of stochastic steps; null = every step but the last"
    )
    shift: float = Field(3.0, gt=0.0, description="SD3 timestep shift of the sigma schedule")
    resolution: int | None = Field(
        None, ge=1, description="image side in pixels of rollouts and evaluations (a multiple "
        "of the VAE factor x patch size, e.g. 16 for SD3); null: the transformer's own "
        "sample_size (128 latents = 1024 px for SD3.5-M)"
    )

    def spec(self, eval: bool = False) -> SamplerSpec:
        """The training sampler, or (``eval``) the deterministic ODE sampler of evaluation."""
        if eval:
            return SamplerSpec(self.eval_num_steps, self.guidance_scale, 0.0, self.sde_type,
                               None, self.shift, self.resolution)
        return SamplerSpec(self.num_steps, self.guidance_scale, self.noise_level, self.sde_type,
                           self.sde_window, self.shift, self.resolution)

    @model_validator(mode="after")
    def _window_fits(self) -> SamplerConfig:
        try:
            self.spec().window()
        except ValueError as e:
            raise ValueError(f"sampler.sde_window: {e}") from None
        return self


class SelfConfidenceConfig(_Section):
    num_probes: int = Field(8, ge=2, description="K noise probes (antithetic pairs, so even)")
    probe_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="rho of the probe window: the last share of trained steps"
    )
    delta: float = Field(1e-6, gt=0.0, description="delta in S_t = -log(MSE_t + delta)")
    aggregation: Literal["paper", "official"] = Field(
        "paper", description="paper: mean of S_t; official: per-step z-score in the group x t(1-t)"
    )
    weight: float = Field(1.0, description="weight of this reward in the combined advantage")
    enabled: bool = Field(
        True, description="false: no self-confidence reward (external rewards only, Flow-GRPO)"
    )
    guidance_scale: float = Field(
        1.0, ge=1.0, description="CFG scale of the scoring velocity; 1 = the conditional "
        "velocity, as SOLACE scores (> 1 only to ablate it)"
    )
    policy: Literal["current", "base"] = Field(
        "current", description="score with the policy that sampled (online, SOLACE) or with the "
        "frozen base model (offline, an ablation)"
    )
    micro_batch: int | None = Field(
        None, ge=1, description="at most this many of the K x group probe latents per "
        "transformer forward (the same rewards); null: all of a group's at once"
    )
    merge_lora: bool = Field(
        False, description="score with the LoRA merged into the transformer's weights "
        "(policy.merged; base weights restored exactly after each call): no extra adapter "
        "matmuls. The reward is not in the policy ratio, so the last-bit differences of a "
        "merged bf16 forward are harmless here (sampling and training stay unmerged)"
    )

    @model_validator(mode="after")
    def _even(self) -> SelfConfidenceConfig:
        if self.num_probes % 2:
            raise ValueError(f"self_confidence.num_probes must be even, got {self.num_probes}")
        return self


class GrpoConfig(_Section):
    group_size: int = Field(16, ge=2, description="G samples per prompt (one GRPO group)")
    prompts_per_step: int = Field(2, ge=1, description="prompts (groups) per training step")
    train_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="rho: the last share of the stochastic steps trained"
    )
    std_mode: Literal["global", "group"] = Field(
        "global", description="advantage std over the whole step or over the group"
    )
    adv_clip: float = Field(5.0, gt=0.0, description="advantages are clipped to [-adv_clip, adv_clip]")
    adv_eps: float = Field(1e-4, gt=0.0, description="epsilon added to the advantage std")
    combine: Literal["advantages", "rewards"] = Field(
        "advantages", description="several rewards: weighted sum of advantages or of rewards"
    )
    clip_range: float = Field(1e-4, gt=0.0, description="PPO ratio clip epsilon")
    objective: Literal["clipped", "decoupled"] = Field(
        "decoupled", description="'clipped': Flow-GRPO's, the ratio against the policy that "
        "sampled (a stale sample outside the clip gets no gradient); 'decoupled': the clip "
        "against the weights being updated, the sampling policy as an importance weight "
        "(identical on-policy; every stale sample keeps its gradient)"
    )
    max_weight: float = Field(
        2.0, gt=0.0, description="objective decoupled: cap on the importance weight "
        "pi_current / pi_sampling of a stale sample"
    )
    beta: float = Field(0.04, ge=0.0, description="KL coefficient")
    kl_form: Literal["exact", "flow_grpo"] = Field(
        "flow_grpo", description="Flow-GRPO's KL (without |dt|), so that beta means what the "
        "reference's beta means; or the exact Gaussian KL, 1/|dt| (3.7x-12x) larger"
    )
    detach_uncond: bool = Field(
        False, description="no gradient through CFG's unconditional branch in the training "
        "forward (Flow-GRPO's choice; SOLACE's code and the default keep it)"
    )
    shuffle_rewards: bool = Field(
        False, description="random-reward control: train on rewards permuted within each group "
        "(samples.jsonl keeps the true rewards), to show what drift alone does"
    )
    frozen: bool = Field(
        False, description="a control that never moves: sample and score every step as the "
        "recipe would, take no optimizer step and evaluate only the base (version 0); "
        "studies.curve's frozen control, at the cost of sampling and scoring alone"
    )
    lr: float = Field(3e-4, gt=0.0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient norm clip")
    micro_batch: int = Field(8, ge=1, description="samples per forward/backward")
    inner_epochs: int = Field(1, ge=1, description="passes over each step's samples")
    credit: Literal["trajectory", "per_step"] = Field(
        "trajectory", description="'trajectory': one advantage per sample for every trained "
        "step (Flow-GRPO); 'per_step': trained step j gets the gain in self-confidence of "
        "the sampler's predicted clean latent from step j to j+1 (the final latent after "
        "the last), normalised per step within the group (self-confidence must be the only "
        "trained reward; docs/credit.md)"
    )


    @model_validator(mode="after")
    def _proximal_is_current(self) -> GrpoConfig:
        if self.objective == "decoupled" and self.inner_epochs != 1:
            raise ValueError("grpo.objective 'decoupled' takes the weights being updated as its "
                             "proximal policy, which holds for inner_epochs 1 only; set "
                             "grpo.inner_epochs=1 or grpo.objective=clipped")
        return self


class RolloutConfig(_Section):
    num_actors: int = Field(1, ge=1, description="rollout actors (custom resource 'rollout' if declared)")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per rollout actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per rollout actor")
    num_threads: int = Field(1, ge=1, description="torch threads inside a rollout actor")
    require_resource: bool = Field(
        False, description="always ask for the 'rollout' resource (autoscaling clusters); "
        "false: only if a node declares it at start"
    )
    max_restarts: int = Field(
        3, ge=0, description="Ray restarts of a rollout actor that dies; its lost call is "
        "sampled again on the restarted actor with the same seeds and weights"
    )
    micro_batch: int | None = Field(
        None, ge=1, description="at most this many trajectories denoised at once in a rollout "
        "actor (a call's groups are sampled in chunks; the same samples); null: a call's "
        "whole batch at once, and evaluations in batches of 32"
    )
    decode_batch: int | None = Field(
        None, ge=1, description="at most this many images decoded by the VAE at once (sample "
        "grids, evaluations, external-reward actors; the same images); null: all of a call "
        "at once (SD3.5-M's VAE needs ~0.37 GiB an image at 512 px in bf16)"
    )
    timeout_s: float = Field(
        1800.0, gt=0, description="longest wait for one step's rollouts and scores (or one "
        "evaluation) before the run stops with a checkpoint, instead of hanging"
    )


class RewardPoolConfig(_Section):
    num_actors: int = Field(1, ge=1, description="self-confidence reward actors at start")
    ready_timeout_s: float = Field(
        600.0, gt=0, description="longest wait for a new reward actor (every pool's) to load "
        "its model and answer; a cold autoscaled node (image pull, download) may need more"
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per reward actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per reward actor")
    num_threads: int = Field(1, ge=1, description="torch threads inside a reward actor")
    require_resource: bool = Field(
        False, description="always ask for the 'reward' resource (autoscaling clusters); "
        "false: only if a node declares it at start"
    )
    timeout_s: float = Field(300.0, gt=0, description="per-call time limit; then retried elsewhere")
    max_retries: int = Field(2, ge=0, description="retries of one group on other actors")
    max_restarts: int = Field(2, ge=0, description="Ray restarts of a reward actor")
    control_name: str = Field(
        "solace-reward-pool", min_length=1, description="Ray name of the pool's size control (actors.scale)"
    )


class ExternalRewardConfig(_Section):
    name: str = Field(min_length=1, description="reward name in metrics and samples.jsonl")
    kind: Literal["actor", "http"] = Field(
        "actor", description="'actor': a scorer class run in the cluster (target); 'http': a "
        "reward server (python -m rewards.serve) at url, called from a client actor"
    )
    target: str | None = Field(
        None, description="kind actor: 'module:Class' of a scorer (images, prompts, metadata) -> [N]"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="kind actor: constructor arguments")
    url: str | None = Field(None, description="kind http: base URL of the server, http(s)://host:port")
    token_env: str | None = Field(
        "SOLACE_REWARD_TOKEN", description="kind http: environment variable holding the bearer "
        "token, on the driver and where the reward actors run; null: send none"
    )
    timeout_s: float = Field(30.0, gt=0, description="kind http: time limit of one HTTP attempt")
    max_retries: int = Field(
        3, ge=0, description="kind http: retries of a call after a timeout, connection error or 5xx"
    )
    backoff_s: float = Field(0.5, ge=0, description="kind http: first retry delay, doubled each retry")
    circuit_failures: int = Field(
        3, ge=1, description="kind http: failed calls in a row after which calls fail fast"
    )
    verify_tls: bool | str = Field(
        True, description="kind http, https URLs: true (system CAs), a PEM certificate/CA file "
        "path, or false (no check)"
    )
    on_failure: Literal["stop", "drop"] = Field(
        "stop", description="when the reward fails for good mid-run: 'stop' saves a checkpoint and "
        "stops; 'drop' trains on without it, the other weights rescaled to the original total"
    )
    weight: float = Field(1.0, description="weight in the combined advantage")
    num_actors: int = Field(1, ge=1, description="actors for this reward")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> ExternalRewardConfig:
        http_only = {"url", "token_env", "timeout_s", "max_retries", "backoff_s",
                     "circuit_failures", "verify_tls"}
        if self.kind == "actor":
            if not self.target:
                raise ValueError(f"reward {self.name!r}: kind 'actor' needs target: "
                                 "'package.module:Class' of a scorer")
            other = http_only
        else:
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ValueError(f"reward {self.name!r}: kind 'http' needs url: "
                                 f"http(s)://host:port of a reward server, got {self.url!r}")
            other = {"target", "kwargs"}
        # Set to a non-default value (a saved config.yaml holds every field, at defaults).
        fields = type(self).model_fields
        wrong = sorted(f for f in other if getattr(self, f) != fields[f].get_default(
            call_default_factory=True))
        if wrong:
            raise ValueError(f"reward {self.name!r}: {', '.join(wrong)} only appl"
                             f"{'ies' if len(wrong) == 1 else 'y'} to kind "
                             f"{'actor' if self.kind == 'http' else 'http'}")
        return self

    def http_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of ``rewards.http.HttpScorer`` (kind http)."""
        return dict(url=self.url, token_env=self.token_env, timeout_s=self.timeout_s,
                    max_retries=self.max_retries, backoff_s=self.backoff_s,
                    circuit_failures=self.circuit_failures, verify_tls=self.verify_tls)

    def worst_case_s(self) -> float:
        """Longest an HTTP call can take through its retries (kind http)."""
        return ((self.max_retries + 1) * self.timeout_s
                + self.backoff_s * (2 ** self.max_retries - 1))


class LearnerConfig(_Section):
    num_ranks: int = Field(1, ge=1, description="DeepSpeed data-parallel ranks (Ray actors)")
    zero_stage: Literal[0, 1, 2] = Field(2, description="DeepSpeed ZeRO stage")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per rank")
    num_threads: int = Field(1, ge=1, description="torch threads inside a rank")
    placement_timeout_s: float = Field(
        600.0, gt=0, description="longest wait for every learner rank to be placed (one "
        "placement group: all ranks or none) before the run stops saying what is missing; "
        "a cold autoscaled GPU node can take minutes"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the transformer blocks' activations in the backward "
        "pass instead of keeping them (less memory, ~1 more forward of compute; the same "
        "gradients)"
    )
    require_resource: bool = Field(
        False, description="always ask for the 'learner' resource (autoscaling clusters); "
        "false: only if a node declares it at start"
    )
    recompute_old_logprobs: bool = Field(
        False, description="before each update, recompute the sampled log-probs on the "
        "learner (no grad, the rollout's own weight version swapped in, the update's "
        "micro-batches), so the ratio's denominator comes from the same kernels, batch "
        "shapes and dtype as its numerator: bf16 GPU kernels differ with batch size, and "
        "with clip_range 1e-4 that drift alone clips samples. Costs one no-grad forward "
        "per trained step and sample (python -m bench onpolicy measures it)"
    )
    max_staleness: int = Field(
        1, ge=0, description="how many weight versions a rollout may lag the learner; 0 = on-policy"
    )
    update_timeout_s: float = Field(
        1800.0, gt=0, description="longest wait for one update of the DeepSpeed ranks before "
        "the run stops with its last checkpoint, instead of hanging"
    )


class RayConfig(_Section):
    address: str | None = Field(
        None, description="cluster to join ('auto', 'ray://...'); null: RAY_ADDRESS or a new local instance"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a new local instance (null: all)")
    namespace: str = Field("solace", min_length=1,
                           description="Ray namespace (actors.scale looks here)")
    autoscaling: bool = Field(
        False, description="the cluster starts nodes on demand (ray_cluster.yaml, KubeRay): "
        "the start-up check then does not ask for the GPUs, CPUs and custom resources to be "
        "there already; false: a run whose actors could never be placed fails at once"
    )
    dashboard: bool = Field(
        True, description="a new local instance serves the Ray dashboard (its URL is printed; "
        "needs ray[default]); false: none, which saves a little memory and start-up time"
    )


class MetricsConfig(_Section):
    port: int = Field(8000, ge=0, le=65535, description="Prometheus endpoint port; 0 disables it")
    host: str = Field(
        "127.0.0.1", min_length=1, description="address the Prometheus endpoint binds to: "
        "127.0.0.1 serves this machine only; 0.0.0.0 exposes it to every interface, for a "
        "Prometheus elsewhere in the cluster to scrape"
    )
    grid_every: int = Field(10, ge=1, description="write a sample grid every N steps (and at the end)")


class TrackingConfig(_Section):
    """Experiment trackers fed by ``learner.tracking.Tracker`` (metrics.jsonl and the
    Prometheus endpoint are written either way; these come on top)."""

    tensorboard: bool = Field(
        True, description="write TensorBoard event files to <run dir>/tensorboard "
        "(view: tensorboard --logdir <run dir>/tensorboard)"
    )
    wandb: bool = Field(False, description="log to Weights & Biases as well")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="'offline': W&B files under <run dir>/wandb, no network and no "
        "account (upload later with `wandb sync`); 'online': stream to the W&B server "
        "(needs `wandb login` or WANDB_API_KEY)"
    )
    wandb_project: str = Field("solace-rl", min_length=1, description="W&B project")
    wandb_entity: str | None = Field(
        None, description="W&B team or user; null: the account's default entity"
    )
    wandb_name: str | None = Field(
        None, description="W&B run display name; null: the run directory's name"
    )
    wandb_group: str | None = Field(
        None, description="W&B run group, e.g. one per study so that its seeds show together"
    )
    wandb_tags: tuple[str, ...] = Field((), description="W&B tags of the run")


class EvalConfig(_Section):
    every: int = Field(
        0, ge=0, description="evaluate held-out prompts every N steps, before the first step and "
        "after the last; 0: never (the presets turn it on)"
    )
    prompts: str = Field(
        "shapes/data/test.jsonl", description="held-out prompt file, .txt or .jsonl (GenEval-style rows; "
        "rows with shapes-world metadata are also graded by ShapesEval)"
    )
    prompts_per_tag: int | None = Field(
        None, ge=1, description="the first N prompts of each tag (rows without a tag count as "
        "one tag); null: every prompt"
    )
    per_prompt: int = Field(
        4, ge=1, description="images per prompt; each starts from fixed noise (eval.seed)"
    )
    seed: int = Field(
        0, ge=0, description="seed of the evaluation noise, independent of the run seed, so "
        "runs of every seed and every version are evaluated on the same images' noise"
    )
    rewards: bool = Field(
        True, description="also score the evaluation images with the run's rewards "
        "(eval/<reward>/mean); false: ShapesEval only"
    )


class EmaConfig(_Section):
    decay: float = Field(
        0.0, ge=0, lt=1, description="EMA of the LoRA weights (learner.ema): ema <- decay * ema "
        "+ (1 - decay) * weights; evaluations use it and checkpoints save it beside the raw "
        "LoRA (lora_ema/); 0: off"
    )
    every: int = Field(1, ge=1, description="average the weights in every N steps")

class TrainConfig(_Section):
    steps: int = Field(20, ge=1, description="training steps (weight versions published)")
    prompts: str = Field(
        "shapes/data/train.jsonl", description="prompt file: .txt (one prompt a line) or .jsonl "
        "(rows with a 'prompt' string, GenEval metadata validated)"
    )
    prompt_mix: Literal["file", "balanced", "spread"] = Field(
        "file", description="'file': prompts drawn as often as the file holds them; "
        "'balanced': one prompt of each tag in turn (rows' 'tag' field); 'spread': tags in "
        "turn as 'balanced', within a tag each prompt drawn in proportion to the mean "
        "within-group std of its advantages so far plus spread_floor (groups whose rewards "
        "are all equal carry no gradient)"
    )
    spread_floor: float = Field(
        0.1, gt=0.0, description="prompt_mix 'spread': added to every prompt's spread, so "
        "that a prompt whose groups scored alike is still drawn now and then"
    )
    tags: list[str] | None = Field(
        None, min_length=1, description="train only on the prompt file's rows with these tags "
        "(e.g. the tags whose groups have reward spread); None: every row"
    )
    out_dir: str = Field("runs", min_length=1, description="parent directory of run directories")
    save_every: int = Field(10, ge=1, description="checkpoint every N steps (and at the end)")
    stop_timeout_s: float = Field(
        60.0, gt=0, description="after SIGTERM/SIGINT: how long the step in flight may take to "
        "finish before the run exits without it (its last checkpoint stands); a second "
        "signal exits at once"
    )


class Config(_Section):
    seed: int = Field(
        0, ge=0, description="run seed: every sample, probe and init derives from it "
        "(numpy's seeding takes no negative seed)"
    )
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    sampler: SamplerConfig = SamplerConfig()
    self_confidence: SelfConfidenceConfig = SelfConfidenceConfig()
    grpo: GrpoConfig = GrpoConfig()
    train: TrainConfig = TrainConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward_pool: RewardPoolConfig = RewardPoolConfig()
    external_rewards: tuple[ExternalRewardConfig, ...] = Field(
        (), description="rewards beside self-confidence, combined by grpo.combine"
    )
    learner: LearnerConfig = LearnerConfig()
    ray: RayConfig = RayConfig()
    metrics: MetricsConfig = MetricsConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    ema: EmaConfig = EmaConfig()

    @model_validator(mode="after")
    def _some_reward_trains(self) -> Config:
        weights = [r.weight for r in self.external_rewards]
        if self.self_confidence.enabled:
            weights.append(self.self_confidence.weight)
        if not any(w != 0 for w in weights):
            raise ValueError("no reward to train on: enable self_confidence or add an external "
                             "reward with a non-zero weight (weight 0 only watches a reward)")
        return self

    @model_validator(mode="after")
    def _distinct_reward_names(self) -> Config:
        names = ["self_confidence"] + [r.name for r in self.external_rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"external_rewards: reward names must be distinct, got {names}")
        return self

    @model_validator(mode="after")
    def _http_retries_fit_the_pool_timeout(self) -> Config:
        # The pool restarts an actor whose call overruns reward_pool.timeout_s: the client's
        # own retries must end first, or they are cut off mid-way.
        for r in self.external_rewards:
            if r.kind == "http" and r.worst_case_s() >= self.reward_pool.timeout_s:
                raise ValueError(
                    f"external_rewards {r.name!r}: (max_retries + 1) * timeout_s + backoff = "
                    f"{r.worst_case_s():.1f} s must be under reward_pool.timeout_s = "
                    f"{self.reward_pool.timeout_s} s; lower timeout_s/max_retries or raise "
                    "reward_pool.timeout_s")
        return self


    @model_validator(mode="after")
    def _per_step_credit_has_its_reward(self) -> Config:
        if self.grpo.credit != "per_step":
            return self
        trained = [r.name for r in self.external_rewards if r.weight != 0]
        if not self.self_confidence.enabled or self.self_confidence.weight == 0 or trained:
            raise ValueError(
                "grpo.credit 'per_step' takes its step rewards from self-confidence, so "
                "self_confidence must be enabled with a non-zero weight and be the only trained "
                f"reward (trained external rewards: {trained or 'none'}); give the others "
                "weight 0 to watch them, or set grpo.credit=trajectory")
        return self

    @model_validator(mode="after")
    def _eval_groups_can_be_normalised(self) -> Config:
        sc = self.self_confidence
        if (self.eval.every and self.eval.rewards and sc.enabled and sc.aggregation == "official"
                and self.eval.per_prompt < 2):
            raise ValueError("eval.per_prompt must be >= 2 when the evaluation is scored with "
                             "self_confidence.aggregation 'official' (it z-scores within each "
                             "prompt's images); raise eval.per_prompt or set eval.rewards false")
        return self


class ConfigError(ValueError):
    """A configuration file or override that does not validate.

    The message is printed as it is, without a traceback: one line per problem, naming the
    dotted field (or ``file:line:column``) and where the bad value came from, the file or
    the ``--set KEY=VALUE`` override.
    """


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML preset (or the defaults) and apply ``a.b=value`` overrides."""
    tree: dict[str, Any] = {} if path is None else _read_preset(Path(path))
    origins = _apply_overrides(tree, overrides)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        path = Path(path) if path is not None else None
        lines = [_describe(err, path, origins) for err in e.errors()]
        if len(lines) == 1:
            raise ConfigError(f"invalid configuration: {lines[0]}") from None
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  {line}" for line in lines)
                          ) from None


# -- reading: file and overrides ---------------------------------------------------------


def _read_preset(path: Path) -> dict[str, Any]:
    """The mapping a YAML preset holds; a bad file is one line naming ``path:line:column``
    (PyYAML's own error is a multi-line report with the offending text quoted)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; presets live in configs/")
    try:
        text = read_utf8(path)
    except ValueError as e:  # names path:line:column of the first bad byte
        raise ConfigError(f"config file {e}") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        line, column, problem = _yaml_problem(e, text)
        raise ConfigError(f"config file {path}:{line}:{column}: not valid YAML: {problem}"
                          ) from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level "
                          f"(section: {{field: value}}), not a {type(tree).__name__}")
    return tree


def _yaml_problem(e: yaml.YAMLError, text: str) -> tuple[int, int, str]:
    """``(line, column, what)`` of a PyYAML error, 1-based, in one line of words."""
    if isinstance(e, yaml.reader.ReaderError):  # a control character, found by position
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        return line, column, f"character #x{e.character:04x} is not allowed"
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    context = getattr(e, "context", None)
    if context:
        problem = f"{problem} ({context})"
    if mark is None:
        return 1, 1, problem
    return mark.line + 1, mark.column + 1, problem


Origins = list[tuple[tuple[str, ...], str]]  # (dotted key as a path, the --set item), in order


def _apply_overrides(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> Origins:
    """Set each ``key=value`` (the value read as YAML) into ``tree``.

    Returns which override set which key, so that a value that fails validation is
    reported as coming from its ``--set`` and not from the preset file.
    """
    origins: Origins = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r} must look like section.field=value, "
                              "e.g. --set train.steps=5")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            _, column, problem = _yaml_problem(e, raw)
            raise ConfigError(f"--set {item}: the value is not valid YAML (column {column} of "
                              f"{raw!r}: {problem}); quote the whole KEY=VALUE for the shell "
                              "when it holds spaces, brackets or braces") from None
        _set_dotted(tree, key, value, item)
        origins.append((tuple(key.split(".")), item))
    return origins


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, item: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for depth, key in enumerate(parents):
        if node.get(key) is None:  # absent, or an empty section in the file ("eval:")
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            section = ".".join(parents[:depth + 1])
            raise ConfigError(f"--set {item}: {section} is not a section (it holds {node!r})")
    node[leaf] = value


# -- reporting validation errors ----------------------------------------------------------


def _describe(err: Any, path: Path | None, origins: Origins) -> str:
    """One pydantic error as ``field: what, got value (from where)``."""
    loc = tuple(str(p) for p in err["loc"])
    field = ".".join(loc)
    if err["type"] == "extra_forbidden":
        known = _known_fields(loc[:-1])
        msg = "unknown field" + (f"; the fields here are {', '.join(known)}" if known else "")
    else:
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        if isinstance(value, str | int | float | bool) or value is None:
            msg += f", got {_short(value)}"
    if field and not msg.startswith(field):  # model validators name their fields themselves
        msg = f"{field}: {msg}"
    origin = _origin(loc, path, origins)
    return f"{msg} ({origin})" if origin else msg


def _origin(loc: tuple[str, ...], path: Path | None, origins: Origins) -> str:
    """Where the value at ``loc`` came from: the last ``--set`` that covers it, else the
    file (with the overrides inside the section, for a check over several fields)."""
    covering = [item for key, item in origins if loc[:len(key)] == key]
    if covering:
        return f"from --set {covering[-1]}"
    inside = [f"--set {item}" for key, item in origins if key[:len(loc)] == loc]
    if path is None:
        return f"from {', '.join(inside)}" if inside else ""
    return f"in {path}" + (f" with {', '.join(inside)}" if inside else "")


def _known_fields(loc: tuple[str, ...]) -> list[str]:
    """The field names of the section at ``loc`` (list indices skipped), for a typo."""
    model: Any = Config
    for key in loc:
        if key.isdigit():
            continue
        info = model.model_fields.get(key) if isinstance(model, type) else None
        if info is None:
            return []
        model = info.annotation
        if getattr(model, "__origin__", None) is tuple:  # tuple[ExternalRewardConfig, ...]
            model = model.__args__[0]
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return list(model.model_fields)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
