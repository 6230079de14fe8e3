"""Unit checks of the shared blocks against independent facts (T5's bucket table, RoPE identities)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite.nn import masks
from t5x_lite.nn.argmax import argmax
from t5x_lite.nn.attention import dot_product_attention
from t5x_lite.nn.positions import apply_rope, relative_position_bucket, rope_inverse_frequencies


def _ranges(spec):
  """'[-200,-91]->15; -7..0->7..0' style table from ../shared/reference/hf_architectures.md section 1.3."""
  out = {}
  for lo, hi, b in spec:
    for r in range(lo, hi + 1):
      out[r] = b
  return out


BIDIRECTIONAL = _ranges([(-200, -91, 15), (-90, -64, 14), (-63, -46, 13), (-45, -32, 12), (-31, -23, 11),
                         (-22, -16, 10), (-15, -12, 9), (-11, -8, 8)]
                        + [(-r, -r, r) for r in range(0, 8)] + [(r, r, 16 + r) for r in range(1, 8)]
                        + [(8, 11, 24), (12, 15, 25), (16, 22, 26), (23, 31, 27), (32, 45, 28), (46, 63, 29),
                           (64, 90, 30), (91, 200, 31)])
CAUSAL = _ranges([(0, 200, 0)] + [(-r, -r, r) for r in range(1, 16)]
                 + [(-18, -16, 16), (-20, -19, 17), (-23, -21, 18), (-26, -24, 19), (-30, -27, 20), (-34, -31, 21),
                    (-39, -35, 22), (-45, -40, 23), (-51, -46, 24), (-58, -52, 25), (-66, -59, 26),
                    (-76, -67, 27), (-86, -77, 28), (-98, -87, 29), (-112, -99, 30), (-300, -113, 31)])


def test_relative_position_buckets_match_t5_table():
  for bidirectional, table in ((True, BIDIRECTIONAL), (False, CAUSAL)):
    rel = np.array(sorted(table))
    got = np.asarray(relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional, num_buckets=32,
                                              max_distance=128))
    want = np.array([table[r] for r in rel])
    bad = rel[got != want]
    assert not bad.size, f"bidirectional={bidirectional}: wrong buckets at {bad[:5]}"


def test_bucket_gradient_free_of_nan():
  # The log branch sees rel=0; it must not poison anything downstream.
  out = relative_position_bucket(jnp.arange(-5, 6), bidirectional=True, num_buckets=8, max_distance=20)
  assert np.all(np.asarray(out) >= 0)


def test_rope_is_relative():
  """<rope(q, m), rope(k, n)> depends only on m - n."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  inv = rope_inverse_frequencies(16, 10_000.0)

  def score(m, n):
    return float(jnp.sum(apply_rope(q, jnp.array([[m]]), inv) * apply_rope(k, jnp.array([[n]]), inv)))

  assert abs(score(7, 3) - score(104, 100)) < 1e-4
  assert abs(score(7, 3) - score(3, 7)) > 1e-3


def test_gqa_head_mapping_matches_repeat_kv():
  """Query head n reads kv head n // G (transformers' repeat_kv), checked against explicit repetition."""
  rng = np.random.default_rng(0)
  B, T, S, N, K, H = 2, 3, 5, 6, 2, 4
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
  mask = masks.key_padding_mask(jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
  got = dot_product_attention(q, k, v, mask=mask, scale=0.5)
  k_rep, v_rep = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k_rep) * 0.5
  logits = jnp.where(mask, logits, -jnp.inf)
  want = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v_rep)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gelu_tanh_derivative_equals_autodiff_of_the_formula():
  from t5x_lite.nn.mlp import gelu_tanh  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(0, 3, 4096).astype(np.float32))
  w = jnp.asarray(rng.normal(0, 1, 4096).astype(np.float32))

  def loss(act):
    return lambda y: jnp.sum(jnp.sin(act(y)) * w)

  ours = jax.grad(loss(gelu_tanh))(x)
  ref = jax.grad(loss(lambda y: jax.nn.gelu(y, approximate=True)))(x)
  np.testing.assert_array_equal(gelu_tanh(x), jax.nn.gelu(x, approximate=True))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
  # Second derivatives still work (the jvp rule is differentiable).
  assert np.isfinite(jax.grad(lambda y: jnp.sum(jax.grad(lambda z: jnp.sum(gelu_tanh(z)))(y)))(x)).all()


def test_xla_cpu_defaults_keep_the_users_flags(monkeypatch):
  from t5x_lite import xla_flags  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  xla_flags.set_cpu_defaults()
  assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                                            *xla_flags.CPU_DEFAULTS]
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot,reduce "
                     "--xla_cpu_collective_call_terminate_timeout_seconds=30")
  xla_flags.set_cpu_defaults()
  assert os.environ["XLA_FLAGS"] == ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce "
                                     "--xla_cpu_collective_call_terminate_timeout_seconds=30")


@pytest.mark.parametrize("N,K,bias_shape,mask_kind,softcap", [
    (4, 4, (1, 4, 5, 7), "segments", None),  # T5 encoder: shared relative bias + per-example mask
    (4, 4, (1, 4, 5, 7), "keys", None),      # key padding only, (B, 1, 1, S)
    (4, 2, None, "segments", None),          # GQA
    (4, 1, None, "causal_full_row", 30.0),   # MQA, Gemma 2 soft-cap, one fully masked query row
    (6, 2, (2, 6, 5, 7), None, None),        # per-example, per-head bias without mask
])
def test_attention_backward_equals_autodiff_of_the_formula(N, K, bias_shape, mask_kind, softcap):
  """attention_core's written-out backward (recomputed probabilities, rowsum(dO * O)) against jax.grad of the
  plain softmax formula, for q, k, v and the bias."""
  rng = np.random.default_rng(1)
  B, T, S, H, G = 2, 5, 7, 8, N // K
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
  bias = None if bias_shape is None else jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
  mask = {None: None, "keys": jnp.asarray(rng.random((B, 1, 1, S)) > 0.3),
          "segments": jnp.asarray(rng.random((B, 1, T, S)) > 0.3),
          "causal_full_row": jnp.asarray(np.tril(np.ones((T, S), bool)) & (np.arange(T) != 2)[:, None])[None, None]
          }[mask_kind]
  w = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)

  def reference(q, k, v, bias):
    logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, G, axis=2)) * 0.3
    if softcap is not None:
      logits = jnp.tanh(logits / softcap) * softcap
    if bias is not None:
      logits = logits + bias
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), jnp.repeat(v, G, axis=2))
    return jnp.sum(jnp.sin(out) * w)

  def ours(q, k, v, bias):
    return jnp.sum(jnp.sin(dot_product_attention(q, k, v, mask=mask, bias=bias, scale=0.3, softcap=softcap)) * w)

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  want = jax.value_and_grad(reference, argnums)(q, k, v, bias)
  got = jax.jit(jax.value_and_grad(ours, argnums))(q, k, v, bias)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=0, atol=2e-6 * max(1.0, float(np.abs(r).max())))


@pytest.mark.parametrize("shape,axis", [((5, 300), -1), ((300, 4), 0), ((2, 40, 3), 1)])
def test_argmax_equals_jnp_argmax_with_ties_nan_and_inf(shape, axis):
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 4, shape).astype(np.float32)  # small integers: many exact ties
  flat = np.moveaxis(x, axis, -1).reshape(-1, shape[axis])
  flat[0, [7, 19]] = np.nan  # NaN counts as the maximum: the first NaN wins
  flat[1, :] = -np.inf
  flat[2, :] = np.inf
  x = np.moveaxis(flat.reshape(np.moveaxis(x, axis, -1).shape), -1, axis)
  got = jax.jit(argmax, static_argnums=1)(jnp.asarray(x), axis)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(x), axis=axis))
