"""The experiment schema: one typed, validated, frozen description of a run.

An experiment is a YAML file (which may ``extends:`` another) plus command-line overrides
(``model.d_model=64``). Defaults live only here. Unknown keys are rejected with a did-you-mean;
cross-field checks name both fields and the fix. Every user mistake becomes a ``ConfigError``
whose message is one line naming the file/override and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from moe import config_io
from moe.config_families import expand_families
from moe.config_io import ConfigError as ConfigError  # re-exported: cfg.ConfigError
from moe.config_sections import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    MixtureConfig,
    ModelConfig,
    MoeConfig,
    PodConfig,
    Section,
    TaskConfig,
    TrainConfig,
)


class Experiment(Section):
    name: str = Field("experiment", min_length=1, description="Run name: runs/<name>/.")
    runs_dir: str = Field("runs", description="Parent directory of run directories.")
    model: ModelConfig = ModelConfig()
    moe: MoeConfig = MoeConfig()
    pod: PodConfig = PodConfig()
    tasks: list[TaskConfig] = Field(
        min_length=1,
        description="The tasks trained together; an entry {family: gettext, ...} "
        "(config_sections.TaskFamily) expands to one named task per language and direction.",
    )
    data: DataConfig = DataConfig()
    mixture: MixtureConfig = MixtureConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @field_validator("name")
    @classmethod
    def _one_directory(cls, name: str) -> str:
        """The run directory is runs_dir/name: a name may not leave runs_dir."""
        if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
            raise ValueError("must be one directory name inside runs_dir (no '/', not '..')")
        return name

    @model_validator(mode="before")
    @classmethod
    def _families(cls, raw: Any) -> Any:
        return expand_families(raw) if isinstance(raw, dict) else raw

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
            self._check_deepseek_routing(decoder_router)
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
        names = {t.name for t in self.tasks}
        unknown = [n for n in self.eval.tasks if n not in names]
        if unknown:
            raise ValueError(
                f"eval.tasks: {', '.join(map(repr, unknown))}: no such task in this experiment"
            )
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

    def evaluated_tasks(self) -> list[int]:
        """Indices of the tasks evaluations cover: ``eval.tasks``, or every task."""
        only = set(self.eval.tasks)
        return [i for i, t in enumerate(self.tasks) if not only or t.name in only]

    def expert_blocks(self, layer: str) -> tuple[int, ...]:
        """The router softmax's expert blocks in ``layer``: ``()`` for a model never grown,
        else its original experts then each growth's (``moe.grown_experts``)."""
        grown = self.moe.grown_experts
        return (self.experts_in(layer) - sum(grown), *grown) if grown else ()

    def _check_deepseek_routing(self, decoder_router: str) -> None:
        moe, ep = self.moe, self.mesh_shape.get("expert", 1)
        new = {"gate": "softmax", "bias_balance_rate": 0, "device_limit": 0, "routed_scaling": 1}
        used = next((k for k, v in new.items() if getattr(moe, k) != v), None)
        other = next((r for r in (moe.router, decoder_router) if r != "token_choice"), None)
        if used and other:
            field = "router" if moe.router == other else "decoder_router"
            raise ValueError(f"moe.{used} needs token-choice routing, not moe.{field}={other}")
        if moe.bias_balance_rate and any(t.frozen for t in self.tasks):
            raise ValueError("moe.bias_balance_rate > 0 would move frozen tasks' routing")
        near = min(
            (moe.device_limit * self.experts_in(x) // ep for x in self.moe_layers), default=0
        )
        if 0 < moe.device_limit < ep and near < moe.top_k:
            raise ValueError(
                f"moe.device_limit={moe.device_limit} of {ep} expert-axis devices leaves {near} "
                f"experts, fewer than moe.top_k={moe.top_k}"
            )

    def _check_pathways(self) -> None:
        layers = self.moe_layers
        for name in self.moe.layer_experts:
            if name not in layers:
                raise ValueError(
                    f"moe.layer_experts: {name!r} is not an MoE layer; {_layers(layers)}"
                )
        grown = sum(self.moe.grown_experts)
        for layer in layers if grown else ():
            if grown >= self.experts_in(layer):
                raise ValueError(
                    f"moe.grown_experts={self.moe.grown_experts} adds {grown} experts, not fewer "
                    f"than the {self.experts_in(layer)} of {layer}"
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


def describe(exp: Experiment) -> str:
    """`moe config show --doc`: every field as ``key: value  # description``, with the
    experiment's resolved values (task fields once, as ``tasks[].key``)."""
    lines: list[str] = []

    def walk(model: BaseModel, prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            value, key = getattr(model, name), f"{prefix}{name}"
            if isinstance(value, BaseModel):
                walk(value, f"{key}.")
            elif key == "tasks" and isinstance(value, list):
                lines.append(f"{key}:  # {field.description or ''}")
                walk(value[0], "tasks[].")
            else:
                text = "null" if value is None else value
                text = str(text).lower() if isinstance(value, bool) else text
                doc = f"  # {field.description}" if field.description else ""
                lines.append(f"{key}: {text}{doc}" if prefix != "tasks[]." else f"{key}{doc}")

    walk(exp, "")
    return "\n".join(lines) + "\n"
