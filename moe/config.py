"""The experiment schema: one typed, validated, frozen description of a run.

An experiment is a YAML file (which may ``extends:`` another) plus command-line overrides
(``model.d_model=64``). Defaults live only here. Unknown keys are rejected with a did-you-mean;
cross-field checks name both fields and the fix. Every user mistake becomes a ``ConfigError``
whose message is one line naming the file/override and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from moe import config_io
from moe.config_io import ConfigError as ConfigError  # re-exported: cfg.ConfigError
from moe.parallel.axes import resolve_mesh_shape
from moe.pod.topology import get_slice


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelConfig(Section):
    kind: Literal["encoder_decoder", "decoder_only"] = Field(
        "encoder_decoder",
        description="encoder_decoder serves translate and lm tasks (lm uses the decoder); "
        "decoder_only serves lm tasks, and translate tasks as a prefix LM.",
    )
    d_model: int = Field(128, gt=0, description="Model (residual stream) width.")
    num_heads: int = Field(4, gt=0, description="Attention heads; must divide d_model.")
    encoder_layers: int = Field(2, ge=0, description="Encoder blocks (encoder_decoder only).")
    decoder_layers: int = Field(2, gt=0, description="Decoder blocks.")
    d_ff: int = Field(512, gt=0, description="Hidden width of each feed-forward (and expert).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout outside the experts.")
    activation: Literal["gelu", "relu"] = Field("gelu", description="Feed-forward activation.")
    vocab_size: int = Field(4000, ge=64, description="Sentencepiece vocabulary size.")
    max_source_length: int = Field(48, gt=0, description="Source tokens kept per example.")
    max_target_length: int = Field(48, gt=1, description="Target tokens kept per example.")


RoutingInput = Literal["token", "task", "token+task"]


class RoutingInputs(Section):
    """What the routers of each stack see (Kudugunta et al. 2021 §3.1, papers §6)."""

    encoder: RoutingInput = Field(
        "token",
        description="token: the token's representation; task: only a learned task embedding "
        "(Task-MoE: every token of a task uses the same experts, dropless); token+task: the "
        "task embedding added to the token's representation.",
    )
    decoder: RoutingInput = Field("token", description="As `encoder`, for decoder MoE layers.")


class MoeConfig(Section):
    num_experts: int = Field(8, ge=1, description="Experts per MoE layer.")
    every: int = Field(
        2, ge=0, description="MoE replaces every n-th feed-forward (n=2: GShard); 0 = dense model."
    )
    top_k: int = Field(2, ge=1, description="Experts per token (token choice); Switch is 1.")
    router: Literal["token_choice", "noisy", "expert_choice", "hierarchical"] = Field(
        "token_choice", description="Routing rule (see moe/routing)."
    )
    decoder_router: Literal["token_choice", "noisy", "expert_choice", "hierarchical"] | None = (
        Field(None, description="Router for decoder MoE layers; default: same as `router`.")
    )
    capacity_factor_train: float = Field(
        1.25, description="Capacity = ceil(cf * k * T / E) in training; <= 0: no token dropped."
    )
    capacity_factor_eval: float = Field(2.0, description="Capacity factor in evaluation.")
    renormalize: bool = Field(True, description="Renormalise the k gates to sum to 1 (GShard).")
    second_expert_policy: Literal["all", "random"] = Field(
        "all", description="random: keep the 2nd choice with prob min(1, g2/threshold)."
    )
    second_expert_threshold: float = Field(0.2, gt=0.0, description="Threshold for `random`.")
    batch_priority: bool = Field(False, description="Batch-prioritised routing (encoder only).")
    jitter: float = Field(0.0, ge=0.0, lt=1.0, description="Multiplicative router input jitter.")
    num_groups: int = Field(0, ge=0, description="Hierarchical MoE: number of primary groups.")
    expert_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout inside experts.")
    shared_expert: bool = Field(False, description="A dense FFN beside the routed experts.")
    aux_loss_weight: float = Field(0.01, ge=0.0, description="Weight of the balance loss.")
    z_loss_weight: float = Field(0.001, ge=0.0, description="Weight of the router z-loss.")
    router_init_std: float = Field(0.02, gt=0.0, description="Router kernel init std.")
    routing_input: RoutingInputs = Field(
        default_factory=RoutingInputs,
        description="Router input: token | task | token+task, one for both stacks or "
        "{encoder: ..., decoder: ...} (Task-MoE found token/task best).",
    )
    layer_experts: dict[str, int] = Field(
        default_factory=dict,
        description="Expert count of named MoE layers ('decoder/1': 2), overriding "
        "num_experts there (written by `moe extract`).",
    )
    capacity_experts: int | None = Field(
        None,
        ge=1,
        description="Compute capacity as if each layer had this many experts (default: its "
        "own count); `moe grow`/`moe extract` keep the original count so old tasks drop "
        "exactly the tokens they dropped before.",
    )

    @field_validator("routing_input", mode="before")
    @classmethod
    def _one_input_for_both(cls, value: Any) -> Any:
        return {"encoder": value, "decoder": value} if isinstance(value, str) else value

    def router_of(self, stack: str) -> str:
        """The routing rule of the MoE layers of ``stack`` ('encoder' | 'decoder')."""
        return (self.decoder_router if stack == "decoder" else None) or self.router


class PodConfig(Section):
    topology: str = Field("cpu", description="Pod catalogue entry: cpu, tpu-v2..v5e, gpu-h100.")
    slice: str | None = Field(None, description="Slice shape, e.g. 4x4 or 2x2x4; None = 1 chip.")

    @field_validator("slice", mode="before")
    @classmethod
    def _slice_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    mesh: dict[str, int] = Field(
        default_factory=lambda: {"data": -1, "expert": 1},
        description="Mesh axis sizes (data, expert[, model]); -1 = the devices left over.",
    )
    processes: int = Field(1, ge=1, description="Processes (MPI ranks) the job is launched with.")

    @model_validator(mode="after")
    def _axes(self) -> PodConfig:
        _ = self.mesh_shape  # an unknown topology, slice or axis, or sizes that miss: one line
        if self.num_devices % self.processes:
            raise ValueError(
                f"pod.processes={self.processes} does not divide the {self.num_devices} devices"
            )
        return self

    @property
    def num_devices(self) -> int:
        """Number of (virtual) devices the pod slice has: the product of the slice dims."""
        return get_slice(self.topology, self.slice).num_chips

    @property
    def mesh_shape(self) -> dict[str, int]:
        """Mesh axis sizes with -1 resolved (``moe.parallel.axes.resolve_mesh_shape``, the one
        resolution), in the order data, expert[, model]."""
        try:
            return resolve_mesh_shape(self.mesh, self.num_devices)
        except ValueError as err:
            raise ValueError(
                f"pod.mesh: {err} of the pod ({self.topology}:{self.slice or 1}); set one axis "
                "to -1 or change pod.slice"
            ) from None


class TaskConfig(Section):
    name: str = Field(min_length=1, description="Task name used in metrics and reports.")
    kind: Literal["lm", "translate"] = Field(description="lm or translate.")
    source: str = Field(
        description="gettext:<lang> | text:<path> | parallel:<src>,<tgt> | tsv:<path>."
    )
    weight: float = Field(
        1.0,
        ge=0.0,
        description="Mixture weight multiplier; 0 = never trained on, still evaluated and in "
        "the vocabulary (reserve a task for a later `moe grow`).",
    )
    max_examples: int | None = Field(None, gt=0, description="Cap on training examples.")
    experts: list[int] | dict[str, list[int]] | None = Field(
        None,
        description="The task's pathway: expert ids it may use in every MoE layer, or "
        "{layer: ids} ('encoder/1', 'decoder/1'; layers not named: all experts). None = all.",
    )
    frozen: bool = Field(
        False,
        description="Freeze every parameter this task uses (its experts, its task embedding, "
        "and all shared non-expert weights); set by `moe grow` on the old tasks.",
    )


class DataConfig(Section):
    locale_dir: str = Field("/usr/share/locale", description="Root of gettext catalogues.")
    valid_fraction: float = Field(0.02, gt=0.0, lt=0.5, description="Held-out validation share.")
    test_fraction: float = Field(0.02, gt=0.0, lt=0.5, description="Held-out test share.")
    max_chars: int = Field(200, gt=0, description="Drop examples longer than this (chars).")
    cache_dir: str = Field(".cache/moe", description="Vocabulary and token-store cache.")


class MixtureConfig(Section):
    temperature: float = Field(
        5.0, gt=0.0, description="q_i ∝ p_i^(1/T): 1 = proportional, large = uniform."
    )


class TrainConfig(Section):
    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(32, gt=0, description="Global batch size (examples).")
    optimizer: Literal["adam", "adamw", "adafactor", "powersign", "addsign"] = Field(
        "adam", description="optax optimizer; the sign rules take SGD-sized learning rates."
    )
    learning_rate: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    schedule: Literal["inverse_sqrt", "cosine", "constant"] = Field(
        "inverse_sqrt", description="After linear warm-up."
    )
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay (adamw).")
    grad_clip: float = Field(1.0, ge=0.0, description="Global-norm clip; 0 = off.")
    sign_alpha: float | None = Field(None, gt=0.0, description="PowerSign α (e) / AddSign α (1).")
    sign_beta: float = Field(0.9, ge=0.0, lt=1.0, description="Sign rules: β of the average m.")
    sign_decay: Literal["constant", "linear", "cyclical", "restart"] = Field(
        "constant", description="Sign rules: decay f(t) of sign(g)sign(m) (Bello et al. 2017)."
    )
    sign_decay_steps: int | None = Field(None, gt=0, description="T of f(t); default steps.")
    sign_decay_periods: float | None = Field(
        None, gt=0.0, description="n of f(t): cyclical (0.5) or restart (1)."
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per step.")
    seed: int = Field(0, description="Seed for init, data order and dropout.")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="Compute dtype (router and losses stay float32)."
    )
    log_every: int = Field(10, gt=0, description="Steps between metric lines.")
    max_bad_steps: int = Field(
        10, ge=1, description="Consecutive non-finite steps tolerated before stopping."
    )

    @model_validator(mode="after")
    def _sign_rules(self) -> TrainConfig:
        names = ("sign_alpha", "sign_beta", "sign_decay", "sign_decay_steps", "sign_decay_periods")
        if self.optimizer not in ("powersign", "addsign"):
            given = [n for n in names if getattr(self, n) != type(self).model_fields[n].default]
            if given:
                raise ValueError(
                    f"train.{given[0]}={getattr(self, given[0])} only applies to "
                    f"train.optimizer=powersign or addsign (got {self.optimizer})"
                )
        elif self.optimizer == "addsign" and (self.sign_alpha or 1.0) < 1:
            raise ValueError(
                f"train.sign_alpha={self.sign_alpha} is below 1 with train.optimizer=addsign: "
                "α - f(t) would turn negative (a step up the loss); use >= 1"
            )
        elif self.sign_decay in ("constant", "linear") and self.sign_decay_periods is not None:
            raise ValueError(
                f"train.sign_decay_periods is set but train.sign_decay={self.sign_decay} has "
                "no periods; use sign_decay=cyclical or restart"
            )
        return self


class EvalConfig(Section):
    every: int = Field(100, ge=0, description="Steps between evaluations; 0 = only at the end.")
    batches: int = Field(4, gt=0, description="Held-out batches for perplexity during training.")
    batch_size: int = Field(32, gt=0, description="Evaluation batch size.")
    split: Literal["valid", "test"] = Field("test", description="Split of the final report.")
    bleu_examples: int = Field(200, ge=0, description="Examples decoded per task for BLEU.")
    beam_size: int = Field(1, ge=1, description="1 = greedy decoding.")
    length_penalty: float = Field(0.6, ge=0.0, description="GNMT length penalty alpha.")
    max_decode_length: int = Field(48, gt=1, description="Longest decoded target.")


class CheckpointConfig(Section):
    every: int = Field(100, ge=0, description="Steps between checkpoints; 0 = only at the end.")
    keep: int = Field(2, ge=1, description="Newest checkpoints kept.")


class Experiment(Section):
    name: str = Field("experiment", min_length=1, description="Run name: runs/<name>/.")
    runs_dir: str = Field("runs", description="Parent directory of run directories.")
    model: ModelConfig = ModelConfig()
    moe: MoeConfig = MoeConfig()
    pod: PodConfig = PodConfig()
    tasks: list[TaskConfig] = Field(min_length=1, description="The tasks trained together.")
    data: DataConfig = DataConfig()
    mixture: MixtureConfig = MixtureConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _cross_field(self) -> Experiment:
        m, moe = self.model, self.moe
        if m.d_model % m.num_heads:
            raise ValueError(
                f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}"
            )
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tasks: the name {dup[0]!r} is used twice; task names must differ")
        if m.kind == "decoder_only" and m.encoder_layers:
            raise ValueError(
                "model.encoder_layers must be 0 when model.kind=decoder_only "
                f"(got {m.encoder_layers})"
            )
        if m.kind == "encoder_decoder" and m.encoder_layers == 0:
            raise ValueError("model.encoder_layers must be >= 1 when model.kind=encoder_decoder")
        if moe.every:
            if moe.top_k > moe.num_experts:
                raise ValueError(f"moe.top_k={moe.top_k} exceeds moe.num_experts={moe.num_experts}")
            decoder_router = moe.router_of("decoder")
            if decoder_router == "expert_choice":
                field = "moe.decoder_router" if moe.decoder_router else "moe.router"
                raise ValueError(
                    f"{field}=expert_choice looks at future tokens and cannot route a causal "
                    "decoder; set moe.decoder_router=token_choice"
                )
            if "hierarchical" in (moe.router, decoder_router):
                g = moe.num_groups
                if g < 2 or moe.num_experts % g:
                    raise ValueError(
                        f"moe.router=hierarchical needs moe.num_groups >= 2 dividing "
                        f"moe.num_experts={moe.num_experts} (got moe.num_groups={g})"
                    )
        if self.train.batch_size % self.train.grad_accum:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} is not divisible by "
                f"train.grad_accum={self.train.grad_accum}"
            )
        if not any(t.weight > 0 for t in self.tasks):
            raise ValueError("every task has weight 0; at least one task must be trained on")
        self._check_pathways()
        self._check_mesh()
        return self

    @property
    def moe_layers(self) -> list[str]:
        """Names of the MoE layers (``encoder/<i>``, ``decoder/<i>``), in model order."""
        every = self.moe.every
        if not every:
            return []
        enc = self.model.encoder_layers if self.model.kind == "encoder_decoder" else 0
        stacks = (("encoder", enc), ("decoder", self.model.decoder_layers))
        return [f"{s}/{i}" for s, n in stacks for i in range(n) if (i + 1) % every == 0]

    def experts_in(self, layer: str) -> int:
        """Number of experts of MoE layer ``layer`` (``moe.layer_experts`` or ``num_experts``)."""
        return self.moe.layer_experts.get(layer, self.moe.num_experts)

    def _check_pathways(self) -> None:
        layers = self.moe_layers
        for name in self.moe.layer_experts:
            if name not in layers:
                raise ValueError(
                    f"moe.layer_experts: {name!r} is not an MoE layer; {_layers(layers)}"
                )
        for i, task in enumerate(self.tasks):
            if task.experts is None:
                continue
            if not layers:
                raise ValueError(f"tasks.{i}.experts is set but the model has no MoE layer")
            if isinstance(task.experts, dict):
                for layer, ids in task.experts.items():
                    self._check_pathway(f"tasks.{i}.experts.{layer}", layer, ids)
            else:
                for layer in layers:
                    self._check_pathway(f"tasks.{i}.experts", layer, task.experts)

    def _check_pathway(self, where: str, layer: str, ids: list[int]) -> None:
        if layer not in self.moe_layers:
            raise ValueError(f"{where}: {layer!r} is not an MoE layer; {_layers(self.moe_layers)}")
        e = self.experts_in(layer)
        if not ids or len(set(ids)) != len(ids) or not all(0 <= x < e for x in ids):
            raise ValueError(f"{where}={ids} must be distinct expert ids in [0, {e}) of {layer}")
        router = self.moe.router_of(layer.split("/")[0])
        if router in ("token_choice", "noisy") and len(ids) < self.moe.top_k:
            raise ValueError(
                f"{where} has {len(ids)} expert(s), fewer than moe.top_k={self.moe.top_k}"
            )

    def _check_mesh(self) -> None:
        mesh = self.mesh_shape
        ep, tp = mesh.get("expert", 1), mesh.get("model", 1)
        if self.moe.every and self.moe.num_experts % ep:
            raise ValueError(
                f"moe.num_experts={self.moe.num_experts} is not divisible by the expert axis "
                f"({ep}); change moe.num_experts or pod.mesh.expert"
            )
        for layer, e in self.moe.layer_experts.items():
            if e % ep:
                raise ValueError(
                    f"moe.layer_experts.{layer}={e} is not divisible by the expert axis ({ep}); "
                    "set pod.mesh.expert=1"
                )
        for key, value in (
            ("model.d_ff", self.model.d_ff),
            ("model.num_heads", self.model.num_heads),
            ("model.vocab_size", self.model.vocab_size),
        ):
            if value % tp:
                raise ValueError(f"{key}={value} is not divisible by the model axis ({tp})")
        # Each data x expert device routes its own rows (one routing group per device), and
        # each process feeds an equal share of them.
        shards = mesh.get("data", 1) * ep
        micro = self.train.batch_size // self.train.grad_accum
        if micro % shards:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} (per micro-batch {micro}) is not "
                f"divisible by the data x expert devices ({shards})"
            )
        if self.eval.batch_size % shards:
            raise ValueError(
                f"eval.batch_size={self.eval.batch_size} is not divisible by the data x expert "
                f"devices ({shards}); each device routes its own rows"
            )

    @property
    def pod_devices(self) -> int:
        """Number of (virtual) devices the pod slice has: the product of the slice dims."""
        return self.pod.num_devices

    @property
    def mesh_shape(self) -> dict[str, int]:
        """Mesh axis sizes with -1 resolved, in the canonical order data, expert[, model]."""
        return self.pod.mesh_shape


def _layers(layers: list[str]) -> str:
    return f"MoE layers are {', '.join(layers)}" if layers else "the model has no MoE layer"


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Load an experiment from a YAML file plus ``key.path=value`` overrides."""
    return config_io.load(Experiment, path, overrides)


def from_dict(raw: dict[str, Any], where: str = "config") -> Experiment:
    """Validate a plain dict; errors name ``where`` and the key."""
    return config_io.validate(Experiment, raw, where)


def dump(exp: Experiment) -> str:
    """The resolved experiment as YAML (what `moe config show` prints and runs save)."""
    return config_io.dump(exp)
