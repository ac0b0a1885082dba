"""The sparsely-gated MoE block: router -> ``moe.routing`` -> dispatch -> experts -> combine.

    y_t = sum_e G(x_t)_e FFN_e(x_t)            (Shazeer et al. 2017 eq. 1; GShard §2.2 eq. 1)

over the ``T = B * S`` tokens of a batch. Which tokens are routed together is the spec's
``routing_groups`` policy, chosen where the experiment becomes objects (``moe.training.build``):
``"batch"``, all ``T`` tokens one group; ``"device"``, each ``(data, expert)`` device of the
ambient mesh routes its own rows (GShard's local group dispatching) and the expert buffers
travel by all-to-all (``moe.parallel.expert_parallel``). Data flow, and where expert parallelism
cuts in::

    x [B, S, d] -> x_td [T, d] --router (float32)--> logits [T, E] --routing.*--> Routing
    dispatch(x_td, slot_token)            -> [E, C, d]   gather by index, empty slot -> 0
        (expert parallelism: all_to_all   -> [E / EP, EP * C, d])
    experts.apply_experts(...)            -> [E, C, d]   batched matmuls in the compute dtype
        (expert parallelism: all_to_all back)
    combine(y_ecd, slot_token, slot_weight, T) -> [T, d] weighted scatter-add in float32

Dispatch and combine are index gathers/scatters (``moe.routing.dispatch``). A dropped token gets
0 from the block and passes through the residual connection.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moe.layers.dense import DenseFFN
from moe.layers.experts import ExpertBank, apply_experts
from moe.layers.router import ROUTERS, Router
from moe.parallel.axes import logical_to_mesh
from moe.parallel.expert_parallel import moe_exchange, psum_model, token_groups
from moe.routing.coactivation import coactivation_stats
from moe.routing.dispatch import combine, dispatch, restrict_to_allowed
from moe.routing.result import Routing, RoutingAux
from moe.routing.token_choice import capacity as expert_capacity

ROUTING_GROUPS = ("batch", "device")


@dataclasses.dataclass(frozen=True)
class MoeSpec:
    """What an MoE block needs to know (built from the experiment in ``moe.training.build``).

    Attributes:
      num_experts: E.
      top_k: experts per token (token choice, noisy); per level for ``hierarchical`` (Shazeer
        App. B uses k = 2 at each level, so a token uses ``top_k ** 2`` experts); expert choice
        gets the same number of slots as top-k token choice (``k * cf`` experts per token on
        average, compute-matched as in Zhou et al. 2022).
      router: 'token_choice' | 'noisy' | 'expert_choice' | 'hierarchical'.
      capacity_factor_train, capacity_factor_eval: ``C = ceil(cf * k * T / E)``; ``<= 0``
        means dropless (ST-MoE §5: 1.25 train, 2.0 eval).
      renormalize, second_expert_policy, second_expert_threshold, batch_priority: token-choice
        options (``moe.routing.token_choice.top_k``); the random second-expert policy applies in
        training only (evaluation keeps every second choice, deterministic).
      jitter: multiplicative router-input jitter ``x * U(1 - eps, 1 + eps)`` in training (ST-MoE
        §3.2, Mesh-TF ``multiplicative_jitter``; eps = 1e-2 there); 0 = off.
      num_groups: A, primary groups of the hierarchical router (``E = A * B``).
      expert_dropout: dropout on the experts' hidden activation (Switch §2.4: 0.4 fine-tuning).
      expert_d_ff: hidden width of each routed expert; 0 = the block's ``d_ff`` (fine-grained
        experts, DeepSeekMoE, Dai et al. 2024: more, narrower experts at equal active FLOPs).
      num_shared_experts: always-on experts beside the routed ones, added to their output
        (DeepSeekMoE shared experts; with 1 at full width, ST-MoE §5's "dense FFN next to each
        sparse layer"). N experts of width ``f`` are one dense FFN of width ``N * f``: the sum
        of N FFNs equals the FFN with their hidden units side by side (biases summed).
      gate: 'softmax' | 'sigmoid' router scores (``moe.routing.token_choice.top_k``).
      routed_scaling: factor on the routed gates (DeepSeek-V3).
      selection_bias: keep a per-expert selection bias (``RouterBias``, auxiliary-loss-free
        balancing; the training step moves it, ``moe.routing.balance``).
      device_limit: M, devices of the expert axis a token's experts may lie on (DeepSeek-V2
        §2.1.3); 0 = no limit.
      expert_devices: D, the expert-axis size the experts are split over; routing counts
        devices in it (device limit, the ``device_fanout`` stat) also when the block runs on
        one device, so the sharded block equals this block group by group. Under a mesh the
        block uses the mesh's expert axis (which must then equal it, unless it is 1).
      router_init_std: normal init std of the router kernel (flaxformer 2e-2, papers §3.4).
      activation: 'gelu' | 'relu' for the experts and the shared expert.
      routing_groups: 'batch' (the call's tokens are one routing group) or 'device' (each
        ``(data, expert)`` device of the ambient mesh routes its own rows; the call's rows must
        divide into that many groups, else ``ValueError``). See the module docstring.
      capacity_experts: compute the capacity as if the layer had this many experts (0: its
        own count); a grown or extracted model keeps its original count, so a task routed
        over the same experts drops the same tokens (``moe grow`` / ``moe extract``).
      expert_blocks: sizes of consecutive expert blocks whose router-softmax normaliser is
        summed block by block (``moe.routing.token_choice.softmax``): a grown model's parent
        experts, then each growth's new ones, so a task the new experts are masked for gets
        the parent's gates bit for bit; ``()``: one block.
      weight_bits: 0 (float experts) or 8 / 4: the expert kernels stored quantised, inference
        only (``moe quantize``; ``moe.layers.quant``).
      routing_stats: add the co-activation counts of ``moe.routing.coactivation`` to the stats
        and return each token's first kept expert (``token_first_expert [B, S, E]``, for the
        next MoE layer's ``previous_first``); evaluation only (``moe.training.evaluation``).
    """

    num_experts: int
    top_k: int = 2
    router: str = "token_choice"
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    renormalize: bool = True
    second_expert_policy: str = "all"
    second_expert_threshold: float = 0.2
    batch_priority: bool = False
    jitter: float = 0.0
    num_groups: int = 0
    expert_dropout: float = 0.0
    expert_d_ff: int = 0
    num_shared_experts: int = 0
    gate: str = "softmax"
    routed_scaling: float = 1.0
    selection_bias: bool = False
    device_limit: int = 0
    expert_devices: int = 1
    router_init_std: float = 0.02
    activation: str = "gelu"
    routing_groups: str = "batch"
    capacity_experts: int = 0
    expert_blocks: tuple[int, ...] = ()
    weight_bits: int = 0
    routing_stats: bool = False

    def __post_init__(self):
        if self.routing_groups not in ROUTING_GROUPS:
            raise ValueError(
                f"routing_groups={self.routing_groups!r} is not one of {ROUTING_GROUPS}"
            )
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} is not one of {ROUTERS}")
        deepseek = self.gate != "softmax" or self.selection_bias or self.device_limit
        if deepseek and self.router != "token_choice":
            raise ValueError(
                f"gate={self.gate!r}, selection_bias and device_limit need router='token_choice'"
                f" (got {self.router!r})"
            )
        if self.expert_devices < 1 or self.num_experts % self.expert_devices:
            raise ValueError(
                f"expert_devices={self.expert_devices} must divide num_experts={self.num_experts}"
            )
        if self.expert_blocks and (
            sum(self.expert_blocks) != self.num_experts or min(self.expert_blocks) < 1
        ):
            raise ValueError(
                f"expert_blocks={self.expert_blocks} must be >= 1 and sum to num_experts="
                f"{self.num_experts}"
            )
        if self.num_experts < 1 or self.top_k < 1:
            raise ValueError(f"num_experts={self.num_experts} and top_k={self.top_k} must be >= 1")
        if self.router != "hierarchical" and self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.router == "hierarchical" and (
            self.num_groups < 1 or self.num_experts % self.num_groups
        ):
            raise ValueError(
                f"router='hierarchical' needs num_groups >= 1 dividing num_experts="
                f"{self.num_experts}; got num_groups={self.num_groups}"
            )

    def choices_per_token(self) -> int:
        """Expert choices each token makes: ``k``, or ``min(k, A) * min(k, B)`` hierarchical."""
        if self.router == "hierarchical":
            a = self.num_groups
            return min(self.top_k, a) * min(self.top_k, self.num_experts // a)
        return self.top_k

    def capacity(self, num_tokens: int, *, train: bool) -> int:
        """Slots per expert for ``num_tokens`` tokens routed together (``T`` when dropless)."""
        cf = self.capacity_factor_train if train else self.capacity_factor_eval
        experts = self.capacity_experts or self.num_experts
        return expert_capacity(num_tokens, experts, self.choices_per_token(), cf)


class MoeBlock(nnx.Module):
    """A feed-forward layer made of ``spec.num_experts`` experts and a router.

    ``__call__(x [B, S, d], *, train, rngs=None, token_mask=None, expert_mask=None,
    router_bias=None) -> (y [B, S, d] in x.dtype, RoutingAux)``; ``y`` is the block's contribution
    (the caller adds the residual), exactly 0 for a token that no expert took.

    Precision: router logits, routing, losses and the combine run in float32 from float32
    inputs (Switch §2.4 selective precision); the experts run in ``dtype``.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        spec: MoeSpec,
        *,
        causal: bool,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.spec = spec
        self.dtype = dtype
        self.router = Router(d_model, spec, causal=causal, rngs=rngs)
        expert_d_ff = spec.expert_d_ff or d_ff
        self.experts = ExpertBank(
            spec.num_experts,
            d_model,
            expert_d_ff,
            activation=spec.activation,
            dropout=spec.expert_dropout,
            dtype=dtype,
            weight_bits=spec.weight_bits,
            rngs=rngs,
        )
        self.shared = (
            DenseFFN(
                d_model,
                spec.num_shared_experts * expert_d_ff,
                activation=spec.activation,
                dtype=dtype,
                rngs=rngs,
            )
            if spec.num_shared_experts
            else None
        )

    def route(
        self,
        x_td: jax.Array,
        *,
        train: bool,
        rngs: nnx.Rngs | None = None,
        token_mask: jax.Array | None = None,
        expert_mask: jax.Array | None = None,
        router_bias: jax.Array | None = None,
        num_devices: int | None = None,
        previous_first: jax.Array | None = None,
    ) -> Routing:
        """The block's routing of flattened tokens ``x_td [T, d]`` (masks and bias flattened
        to ``[T]``, ``[T, E]``, ``[T, d]``); a masked expert holds none of its masked tokens.
        ``num_devices``: the expert-axis size (default ``spec.expert_devices``). With
        ``spec.routing_stats``, the stats get the co-activation counts (``previous_first
        [T, E']``: the previous MoE layer's first kept experts of the same tokens).

        The capacity rule (``MoeSpec.capacity``) counts the real tokens of ``token_mask``: the
        buffers keep ``capacity(T)`` slots (a static shape), of which ``capacity(n_real)`` are
        used, so padding neither adds slots nor takes them (packed rows have little of it)."""
        num_tokens = x_td.shape[0]
        limit = None
        if token_mask is not None:  # capacity counts the group's real tokens, not its padding
            table = [self.spec.capacity(n, train=train) if n else 1 for n in range(num_tokens + 1)]
            limit = jnp.asarray(table, jnp.int32)[jnp.sum(token_mask.astype(jnp.int32))]
        routing = self.router(
            x_td,
            capacity=self.spec.capacity(num_tokens, train=train),
            train=train,
            rngs=rngs,
            token_mask=token_mask,
            expert_mask=expert_mask,
            router_bias=router_bias,
            capacity_limit=limit,
            num_devices=num_devices or self.spec.expert_devices,
        )
        if limit is not None:
            routing = dataclasses.replace(
                routing, stats={**routing.stats, "capacity": limit.astype(jnp.float32)}
            )
        if expert_mask is not None:
            routing = restrict_to_allowed(routing, expert_mask.astype(bool))
        if self.spec.routing_stats:
            extra = coactivation_stats(routing, x_td.shape[0], previous_first)
            routing = dataclasses.replace(routing, stats={**routing.stats, **extra})
        return routing

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        rngs: nnx.Rngs | None = None,
        token_mask: jax.Array | None = None,
        expert_mask: jax.Array | None = None,
        router_bias: jax.Array | None = None,
        previous_first: jax.Array | None = None,
    ) -> tuple[jax.Array, RoutingAux]:
        """Args:
        x: [B, S, d] token representations.
        train: training mode (jitter, noise, random second expert, expert dropout, and the
          training capacity factor).
        rngs: ``router`` stream (jitter, noise, random policy) and ``dropout`` stream.
        token_mask: optional bool[B, S]; False (padding) tokens are not routed (output 0).
        expert_mask: optional bool[B, S, E]; False keeps a token away from an expert
          (task pathways): its router logit is masked and it gets no slot there.
        router_bias: optional [B, S, d] (a task embedding) added to the router input only.
        previous_first: optional [B, S, E'] (``spec.routing_stats`` only), the previous MoE
          layer's ``token_first_expert`` for these tokens.
        """
        batch, seq, d = x.shape
        num_tokens = batch * seq
        x_td = x.reshape(num_tokens, d)  # [T, d]
        masks = {"token_mask": token_mask, "expert_mask": expert_mask, "router_bias": router_bias}
        if previous_first is not None:
            masks["previous_first"] = previous_first
        mesh = jax.sharding.get_abstract_mesh()
        if self._groups(mesh, batch) > 1:
            y_td, aux = self._exchange(x, mesh, train, rngs, masks)
        else:
            y_td, aux = self._local(x_td, train, rngs, masks)
            aux, per_token = aux.split_per_token()  # [T, ...] -> [B, S, ...]
            per_token = {k: v.reshape(batch, seq, *v.shape[1:]) for k, v in per_token.items()}
            aux = RoutingAux(aux.aux_loss, aux.z_loss, {**aux.stats, **per_token})
        if self.shared is not None:
            y_td = y_td + self.shared(x_td, train=train, rngs=rngs).astype(jnp.float32)
        return y_td.reshape(batch, seq, d).astype(x.dtype), aux

    def _groups(self, mesh, rows: int) -> int:
        """Routing groups of a call with ``rows`` rows (module docstring); raises ValueError
        when the mesh cannot take the spec's policy."""
        if self.spec.routing_groups == "batch":
            return 1
        groups = token_groups(mesh)
        if groups == 1:
            return 1
        shape = dict(mesh.shape)
        if "expert" not in shape:
            raise ValueError(f"routing_groups='device' needs an 'expert' mesh axis; mesh {shape}")
        if rows % groups:
            raise ValueError(
                f"MoE block: {rows} rows do not split into the {groups} routing groups of mesh "
                f"{shape} (one per data x expert device); use a batch size divisible by {groups}"
            )
        if self.spec.num_experts % shape["expert"]:
            raise ValueError(
                f"MoE block: {self.spec.num_experts} experts do not split over the expert axis "
                f"({shape['expert']})"
            )
        if self.spec.expert_devices not in (1, shape["expert"]):
            raise ValueError(
                f"MoE block: spec.expert_devices={self.spec.expert_devices} but the mesh's "
                f"expert axis is {shape['expert']}"
            )
        return groups

    def _local(self, x_td, train, rngs, masks):
        """All tokens as one routing group on this program's devices -> (y_td [T, d], aux)."""
        num_tokens = x_td.shape[0]
        flat = {
            k: None if a is None else a.reshape(num_tokens, *a.shape[2:]) for k, a in masks.items()
        }
        routing = self.route(x_td, train=train, rngs=rngs, **flat)
        buffers = dispatch(x_td, routing.slot_token).astype(self.dtype)  # [E, C, d]
        y_ecd = self.experts(buffers, train=train, rngs=rngs)  # [E, C, d]
        y_td = combine(y_ecd, routing.slot_token, routing.slot_weight, num_tokens)  # [T, d]
        return y_td, routing.aux()

    def _exchange(self, x, mesh, train, rngs, masks):
        """Expert parallelism: each (data, expert) device routes its own rows as one group and
        the ``[E, C, d]`` buffers travel by all_to_all (``moe.parallel.expert_parallel``):
        ``x [B, S, d] -> (y_td [T, d] float32, RoutingAux)`` averaged over the groups.

        Router rngs (jitter, noise, random policy) and expert dropout draw one key each from
        ``rngs`` here, outside ``shard_map``; each group folds in its index.
        """
        spec, bank = self.spec, self.experts
        extras = {k: v for k, v in masks.items() if v is not None}
        keys = {}
        needs_router = (
            spec.jitter > 0
            or spec.router == "noisy"
            or (spec.second_expert_policy == "random" and spec.top_k > 1)
        )
        if train and rngs is not None and needs_router:
            keys["router"] = rngs.router()
        if train and rngs is not None and bank.dropout_rate > 0:
            keys["dropout"] = rngs.dropout()
        names = bank.param_names  # with w_in_scale, w_out_scale when quantised (moe quantize)
        variables = {n: getattr(bank, n) for n in names}
        params = {n: v[...] for n, v in variables.items()}
        specs = {
            n: logical_to_mesh(v.get_metadata().get("out_sharding"), mesh)
            for n, v in variables.items()
        }
        split_hidden = mesh.shape.get("model", 1) > 1
        num_devices = mesh.shape["expert"]  # device limit and fan-out count these devices

        def route(x_td, extras_td, keys_l):
            router_rngs = nnx.Rngs(router=keys_l["router"]) if "router" in keys_l else None
            return self.route(
                x_td, train=train, rngs=router_rngs, num_devices=num_devices, **extras_td
            )

        def experts(p, recv, keys_l):
            b_out = jnp.zeros_like(p["b_out"]) if split_hidden else p["b_out"]
            y = apply_experts(
                p["w_in"], p["b_in"], p["w_out"], b_out, recv,
                activation=bank.activation, dtype=bank.dtype, dropout=bank.dropout_rate,
                dropout_key=keys_l.get("dropout"),
                w_in_scale=p.get("w_in_scale"), w_out_scale=p.get("w_out_scale"),
            )  # fmt: skip
            if split_hidden:  # partial sums over the hidden units of this model shard
                y = psum_model(y) + p["b_out"].astype(y.dtype)[:, None, :]
            return y

        y, aux = moe_exchange(
            x, mesh=mesh, route=route, experts=experts, expert_params=params,
            expert_specs=specs, extras=extras, key=keys,
        )  # fmt: skip
        return y.reshape(-1, y.shape[-1]), aux  # [T, d]
