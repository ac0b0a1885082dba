"""The token negative log-likelihood that training and evaluation use (``step.token_nll``),
against known distributions and a slow reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.training.step import smoothed_nll, token_nll


def perplexity(logits, targets):
    nll, mask = token_nll(logits, targets)
    return math.exp(float(nll.sum()) / float(mask.sum())), int(mask.sum())


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    logits = jnp.zeros((2, 5, 7))
    targets = jax.random.randint(jax.random.key(0), (2, 5), 1, 7)  # 0 is padding
    ppl, count = perplexity(logits, targets)
    assert count == 10 and ppl == pytest.approx(7.0, rel=1e-5)


def test_perplexity_of_fixed_distribution_on_its_own_samples_is_exp_entropy():
    probs = np.array([0.5, 0.25, 0.125, 0.125])
    # Targets (ids 1..4; id 0 is padding, probability 0) in exact proportion to probs, so the
    # empirical NLL is the entropy.
    targets = jnp.array([[1, 1, 1, 1, 2, 2, 3, 4]])
    logits = jnp.broadcast_to(jnp.log(jnp.array([0.0, *probs])), (1, 8, 5))
    entropy = -np.sum(probs * np.log(probs))
    assert perplexity(logits, targets)[0] == pytest.approx(math.exp(entropy), rel=1e-5)


def test_padding_positions_do_not_count():
    key_l, key_t = jax.random.split(jax.random.key(1))
    logits = jax.random.normal(key_l, (2, 4, 5))
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
    targets = jnp.where(mask, jax.random.randint(key_t, (2, 4), 1, 5), 0)
    nll, counted = token_nll(logits, targets)
    # Reference: a loop over the unpadded positions only.
    x, y = np.asarray(logits, np.float64), np.asarray(targets)
    ref = [
        np.log(np.sum(np.exp(x[b, t]))) - x[b, t, y[b, t]]
        for b in range(2)
        for t in range(4)
        if mask[b, t]
    ]
    assert int(counted.sum()) == 5
    assert float(nll.sum()) == pytest.approx(float(sum(ref)), rel=1e-5)
    # Garbage in padded positions changes nothing.
    nll2, _ = token_nll(logits.at[0, 3].set(1e4), targets)
    assert float(nll2.sum()) == pytest.approx(float(nll.sum()), rel=1e-6)


def test_bf16_logits_are_scored_in_float32():
    logits = jnp.zeros((1, 3, 50), jnp.bfloat16)
    nll, _ = token_nll(logits, jnp.ones((1, 3), int))
    assert nll.dtype == jnp.float32
    assert perplexity(logits, jnp.ones((1, 3), int))[0] == pytest.approx(50.0, rel=1e-5)


def test_label_smoothing_mixes_the_nll_with_the_mean_over_the_vocabulary():
    logits = jax.random.normal(jax.random.key(2), (1, 3, 6))
    targets = jnp.array([[2, 5, 0]])
    nll, mask = token_nll(logits, targets)
    got = smoothed_nll(logits, nll, mask, 0.1)
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))
    for t, y in enumerate([2, 5]):  # by hand: 0.9 * -log p_y + 0.1 * mean_v(-log p_v)
        assert float(got[0, t]) == pytest.approx(-0.9 * logp[0, t, y] - 0.1 * logp[0, t].mean())
    assert float(got[0, 2]) == 0.0  # padding
