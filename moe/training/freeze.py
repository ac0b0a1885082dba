"""Training part of a model: optimizer state and updates for the trainable rows alone.

A grown model (``moe grow``) trains its new experts, router columns and task embedding rows,
and freezes the rest. Freezing is finer than whole parameters: an expert bank ``w_in [E, d, f]``
holds frozen old experts and trainable new ones. :func:`train_only` wraps an optax optimizer so
that it sees a *view* of each parameter, its trainable rows gathered along one axis:

    leaf [E, d, f], rows (axis 0, index [8, 9, 10, 11]) -> view [4, d, f]
    inner optimizer state (Adam mu, nu, ...)            -> [4, d, f]: nothing for frozen rows
    inner updates [4, d, f] -> scattered into -0.0 everywhere else

A wholly frozen leaf's view is an empty ``optax.MaskedNode``, so it has no optimizer state at
all; a wholly trainable one is passed through. Gradient clipping inside the wrapped optimizer
measures the trainable gradients only. Frozen entries get the update ``-0.0``, and
``p + (-0.0) == p`` bit for bit for every float ``p`` (``+0.0 + -0.0 = +0.0``,
``-0.0 + -0.0 = -0.0``), so frozen parameters stay bit-identical whatever the optimizer (weight
decay included).

Placement: the state is not shaped like the parameters, so ``optax.tree_map_params`` (which
``Placement`` uses to shard optimizer state like the parameters) sees it as non-parameter state
and replicates it. That keeps it correct on any mesh (a row view of an expert-sharded bank need
not divide the expert axis) at the cost of memory for the (few) trainable rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Rows:
    """The trainable part of one parameter: ``index`` along ``axis`` (sorted, distinct)."""

    axis: int
    index: tuple[int, ...]


# select(path, shape) -> True (train the whole leaf), False (freeze it) or Rows.
Selector = Callable[[tuple, tuple[int, ...]], "bool | Rows"]


def _view_leaf(leaf, sel):
    if sel is True:
        return leaf
    if sel is False:
        return optax.MaskedNode()  # no leaf, so no optimizer state
    return jnp.take(leaf, jnp.asarray(sel.index, jnp.int32), axis=sel.axis)  # [.., n, ..]


def trainable_view(tree, select: Selector):
    """``tree`` with every leaf replaced by its trainable rows (see the module docstring)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _view_leaf(leaf, select(path, leaf.shape)), tree
    )


def _unview(view_updates, like, select: Selector):
    """Full-shape updates: the view's rows in place, -0.0 elsewhere (p + -0.0 == p exactly)."""
    flat = jax.tree_util.tree_flatten_with_path(view_updates)[0]
    rows = {jax.tree_util.keystr(path): u for path, u in flat}

    def one(path, leaf):
        sel = select(path, leaf.shape)
        if sel is True:
            return rows[jax.tree_util.keystr(path)]
        out = jnp.full(leaf.shape, -0.0, leaf.dtype)
        if sel is False:
            return out
        where = (slice(None),) * sel.axis + (jnp.asarray(sel.index, jnp.int32),)
        return out.at[where].set(rows[jax.tree_util.keystr(path)].astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(one, like)


def train_only(
    inner: optax.GradientTransformation, select: Selector, abstract_params=None
) -> optax.GradientTransformation:
    """``inner`` applied to the trainable rows chosen by ``select``; frozen entries get -0.0.

    ``select(path, shape)`` is called with each parameter's tree path and shape and returns
    True, False or :class:`Rows`. ``abstract_params`` (the parameters' shapes, e.g. from
    ``nnx.eval_shape``) answers ``optax.tree_map_params``'s probe (module docstring); without
    it the optimizer cannot be placed by ``Placement``.
    """

    def init(params):
        if not jax.tree.leaves(params):  # optax.tree_map_params probes with a leafless tree
            if abstract_params is None:
                raise ValueError("train_only needs abstract_params to be placed on a mesh")
            return jax.eval_shape(lambda p: inner.init(trainable_view(p, select)), abstract_params)
        return inner.init(trainable_view(params, select))

    def update(updates, state, params=None):
        view_params = None if params is None else trainable_view(params, select)
        new, state = inner.update(trainable_view(updates, select), state, view_params)
        return _unview(new, updates, select), state

    return optax.GradientTransformation(init, update)


def path_names(path: tuple) -> tuple[str, ...]:
    """A tree path as plain names: ``('decoder', '1', 'ffn', 'experts', 'w_in')`` (a trailing
    ``value``, the ``nnx.Variable`` field, is dropped)."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    return tuple(names[:-1] if names and names[-1] == "value" else names)
