"""The sections of the experiment schema (``moe.config.Experiment``): model, moe, pod, tasks,
data, mixture, train, eval, checkpoint. Defaults and per-field checks live here; checks that
need two sections live on ``Experiment``."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moe.parallel.axes import resolve_mesh_shape
from moe.pod.topology import get_slice


class Section(BaseModel):
    # allow_inf_nan=False: `.inf` and `.nan` are never valid settings (learning_rate=.inf used to
    # train to the end on NaN; capacity_factor_eval=.nan crashed the final evaluation).
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )


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
    max_source_length: int = Field(
        48, ge=3, description="Source tokens kept per example (a task tag, >= 1 token, eos)."
    )
    max_target_length: int = Field(48, gt=1, description="Target tokens kept per example.")
    weight_bits: Literal[0, 4, 8] = Field(
        0,
        description="Inference only, written by `moe quantize`: expert kernels stored as 8- or "
        "4-bit integers with per-channel scales; 0 = float.",
    )
    quantize_dense: bool = Field(
        False, description="With weight_bits: also the attention and dense feed-forward kernels."
    )


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
    # Old keys: overrides reach `_migrate` (moe.config_io); see docs/experiments_routing.md
    removed_keys: ClassVar[tuple[str, ...]] = ("shared_expert",)

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
    expert_d_ff: int | None = Field(
        None, gt=0, description="Width of each routed expert (fine-grained); None = model.d_ff."
    )
    num_shared_experts: int = Field(0, ge=0, description="Always-on experts (DeepSeekMoE).")
    gate: Literal["softmax", "sigmoid"] = Field("softmax", description="Router score function.")
    routed_scaling: float = Field(1.0, gt=0.0, description="Factor on the routed gates.")
    bias_balance_rate: float = Field(
        0.0, ge=0.0, description="Loss-free balancing bias update speed; 0 = off (papers: 1e-3)."
    )
    device_limit: int = Field(0, ge=0, description="Devices per token's experts; 0 = no limit.")
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
    grown_experts: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="Experts each `moe grow` added to every MoE layer, in order (written by "
        "`moe grow`): the router softmax sums the parent's experts and each growth's block "
        "separately, so old tasks keep the parent's gates bit for bit.",
    )

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if value.get("shared_expert", False) is not False:
            raise ValueError("moe.shared_expert is gone: write `moe.num_shared_experts: 1` instead")
        return {k: v for k, v in value.items() if k != "shared_expert"}  # false: the default

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
    collectives: Literal["auto", "gloo", "mpi"] = Field(
        "auto",
        description="Cross-process CPU collectives: auto = gloo (measured fastest that works "
        "here); mpi = jaxlib's MPItrampoline (opt-in: needs MPITRAMPOLINE_LIB and one device "
        "per process).",
    )

    @model_validator(mode="after")
    def _axes(self) -> PodConfig:
        _ = self.mesh_shape  # an unknown topology, slice or axis, or sizes that miss: one line
        if self.num_devices % self.processes:
            raise ValueError(
                f"pod.processes={self.processes} does not divide the {self.num_devices} devices"
            )
        if self.collectives == "mpi" and self.num_devices != self.processes:
            raise ValueError(
                f"pod.collectives=mpi needs one device per process (JAX's MPI collectives), but "
                f"{self.num_devices} devices over pod.processes={self.processes}"
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
    bleu_tokenize: (
        Literal["13a", "intl", "char", "zh", "ja-mecab", "flores101", "flores200", "none"] | None
    ) = Field(
        None,
        description="sacrebleu tokenizer of the task's BLEU; None = by the target language "
        "(ja-mecab for gettext:ja, zh for gettext:zh, 13a otherwise).",
    )
    frozen: bool = Field(
        False,
        description="Freeze every parameter this task uses (its experts, its task embedding, "
        "and all shared non-expert weights); set by `moe grow` on the old tasks.",
    )
    reverse: bool = Field(
        False,
        description="Translate the source's other side into its first (gettext:xx: xx -> "
        "English); the split still follows the English side, the tag is <2en>.",
    )
    group: str | None = Field(
        None, description="The task family this task came from (gettext/en-x, gettext/x-en)."
    )


class DataConfig(Section):
    locale_dir: str = Field("/usr/share/locale", description="Root of gettext catalogues.")
    valid_fraction: float = Field(0.02, gt=0.0, lt=0.5, description="Held-out validation share.")
    test_fraction: float = Field(0.02, gt=0.0, lt=0.5, description="Held-out test share.")
    max_chars: int = Field(200, gt=0, description="Drop examples longer than this (chars).")
    cache_dir: str = Field(".cache/moe", description="Vocabulary and token-store cache.")
    normalization: Literal["nfkc", "identity"] = Field(
        "nfkc",
        description="Vocabulary text normalisation: nfkc maps full-width forms, `…` and `№` "
        "to ASCII (the model can then never write them); identity keeps text as written.",
    )
    vocab_per_language: int | None = Field(
        None,
        gt=0,
        description="Texts of each language in the vocabulary's training sample (a fixed "
        "subset), so every language gets its share; None = all texts pooled.",
    )
    character_coverage: float = Field(
        1.0, gt=0.9, le=1.0, description="SentencePiece character coverage (0.9995 for CJK)."
    )


class MixtureConfig(Section):
    temperature: float = Field(
        5.0, gt=0.0, description="q_i ∝ p_i^(1/T): 1 = proportional, large = uniform."
    )


class TrainConfig(Section):
    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(
        32,
        gt=0,
        description="Global batch size in rows of (max_source_length, max_target_length) "
        "tokens; one example a row, or several with `pack`.",
    )
    pack: bool = Field(
        True,
        description="Pack several examples into each row (T5X-style: attention never crosses "
        "examples, the loss is per token), so few positions are padding; false: one a row.",
    )
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
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="Label smoothing of the training loss (0.1 is usual)."
    )
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
    sample_seed: int = Field(
        0, description="Seed of the random sample of `bleu_examples` sentences (recorded)."
    )
    max_examples: int | None = Field(
        None,
        gt=0,
        description="Held-out examples kept per task and split: a fixed random subset "
        "(perplexity and BLEU use it); None = the whole split.",
    )
    beam_size: int = Field(1, ge=1, description="1 = greedy decoding.")
    length_penalty: float = Field(0.6, ge=0.0, description="GNMT length penalty alpha.")
    max_decode_length: int = Field(48, gt=1, description="Longest decoded target.")
    no_repeat_ngram: int = Field(
        0, ge=0, description="Never repeat an n-gram of this size within a decoded line (0 = off)."
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="Tasks evaluated (during training and at the end), by name; empty = every "
        "task. Each task's figures do not depend on which others are evaluated.",
    )


class CheckpointConfig(Section):
    every: int = Field(100, ge=0, description="Steps between checkpoints; 0 = only at the end.")
    keep: int = Field(2, ge=1, description="Newest checkpoints kept.")
