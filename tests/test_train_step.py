"""The train step: loss equals transformers', accumulation equals one big batch, sharded equals single-device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers as tf
from conftest import T5_TINY, build_hf
from jax.sharding import PartitionSpec as P

import t5x_lite
from t5x_lite.models.params import axes_tree
from t5x_lite.models.registry import family_of_config
from t5x_lite.training import optimizers
from t5x_lite.training.losses import cross_entropy
from t5x_lite.training.step import loss_sums, make_train_step


def _t5_batch(rng, B=4, S=10, T=6, vocab=128):
  enc = rng.integers(3, vocab, (B, S))
  targets = rng.integers(3, vocab, (B, T))
  return {"input_ids": enc, "encoder_segment_ids": np.ones((B, S), np.int32),
          "encoder_positions": np.tile(np.arange(S), (B, 1)),
          "decoder_input_ids": np.concatenate([np.zeros((B, 1), int), targets[:, :-1]], axis=1),
          "decoder_target_ids": targets, "decoder_segment_ids": np.ones((B, T), np.int32),
          "decoder_positions": np.tile(np.arange(T), (B, 1)), "decoder_loss_weights": np.ones((B, T), np.float32)}


def test_loss_equals_transformers(tmp_path):
  hf = build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY), tmp_path)
  model = t5x_lite.load(str(tmp_path), progress=False)
  batch = _t5_batch(np.random.default_rng(0))
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(batch["input_ids"]), labels=torch.tensor(batch["decoder_target_ids"])).loss.item()
  out = loss_sums(model.params, model.config, jax.tree.map(jnp.asarray, batch), None, label_smoothing=0.0,
                  z_loss=0.0)
  assert float(out["loss"] / out["weight_sum"]) == pytest.approx(ref, rel=1e-5)


def test_label_smoothing_and_z_loss():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, (2, 3)))
  w = jnp.ones((2, 3))
  plain = cross_entropy(logits, targets, w)
  z = cross_entropy(logits, targets, w, z_loss=1e-2)
  lse = jax.nn.logsumexp(logits, -1)
  assert float(z["loss"] - plain["loss"]) == pytest.approx(float(1e-2 * jnp.sum(lse ** 2)), rel=1e-5)
  # Smoothing: cross-entropy against the smoothed distribution minus its entropy.
  s = 0.1
  soft = jnp.full((2, 3, 7), s / 6).at[jnp.arange(2)[:, None], jnp.arange(3)[None], targets].set(1 - s)
  want = -jnp.sum(soft * jax.nn.log_softmax(logits)) + jnp.sum(soft * jnp.log(soft))
  assert float(cross_entropy(logits, targets, w, label_smoothing=s)["loss"]) == pytest.approx(float(want), rel=1e-5)


def _axes(config):
  return axes_tree(family_of_config(config).param_specs(config))


def _init(config, params, opt):
  return {"step": jnp.int32(0), "params": params, "opt_state": opt.init(params)}


@pytest.mark.parametrize("opt_name", ["adafactor", "adamw"])
def test_accumulation_equals_one_big_batch(tmp_path, opt_name):
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY, feed_forward_proj="gated-gelu"), tmp_path)
  model = t5x_lite.load(str(tmp_path), progress=False)
  opt, sched = optimizers.make_optimizer(opt_name, "rsqrt", param_axes=_axes(model.config))
  batch = jax.tree.map(jnp.asarray, _t5_batch(np.random.default_rng(2), B=8))
  one = jax.jit(make_train_step(model.config, opt, sched))
  four = jax.jit(make_train_step(model.config, opt, sched, accumulation_steps=4))
  s1, m1 = one(_init(model.config, model.params, opt), batch, None)
  s4, m4 = four(_init(model.config, model.params, opt), batch, None)
  assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-5)
  # The gradients themselves (SGD with learning rate 1 moves each parameter by exactly minus its gradient).
  sgd = optax.sgd(1.0)
  g1, _ = jax.jit(make_train_step(model.config, sgd, sched))(_init(model.config, model.params, sgd), batch, None)
  g4, _ = jax.jit(make_train_step(model.config, sgd, sched, accumulation_steps=4))(
      _init(model.config, model.params, sgd), batch, None)
  grads = jax.tree.map(lambda p, q: p - q, model.params, g1["params"])
  grads4 = jax.tree.map(lambda p, q: p - q, model.params, g4["params"])
  # Float32 summation order differs between one batch and four micro-batches: agreement is measured against
  # each tensor's gradient scale (measured: every leaf within 6e-6 of its max |g|), not per element, since an
  # element whose gradient terms cancel keeps only the rounding noise.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(np.abs(a).max())),
               grads, grads4)
  # The optimizer step: Adam moves a parameter by lr * g / (|g| + eps), which turns float summation-order
  # differences of a gradient near eps into visible ones (measured: |g| = 1.3e-7 moved 0.56% of a 0.01 step).
  # Parameters whose gradient is 100x eps or more must agree to 0.1% of a step.
  for a, b, g in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"]), jax.tree.leaves(grads)):
    keep = np.abs(np.asarray(g)) >= (1e-6 if opt_name == "adamw" else 0.0)
    np.testing.assert_allclose(np.asarray(a)[keep], np.asarray(b)[keep], rtol=2e-4, atol=1e-5)


def test_frozen_params_keep_their_values_and_hold_no_optimizer_state(tmp_path):
  """train.frozen: the frozen subtree (here the encoder stack) is bit-identical after a step, the rest moves, the
  optimizer keeps no moments for it, and a path that names nothing is refused by name."""
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY), tmp_path)
  model = t5x_lite.load(str(tmp_path), progress=False)
  opt, sched = optimizers.make_optimizer("adamw", "rsqrt")
  labels = optimizers.frozen_labels(model.params, ("encoder",))
  frozen_opt = optimizers.with_frozen(opt, labels)
  batch = jax.tree.map(jnp.asarray, _t5_batch(np.random.default_rng(3)))
  step = jax.jit(make_train_step(model.config, frozen_opt, sched, frozen_labels=labels))
  state, _ = step(_init(model.config, model.params, frozen_opt), batch, None)
  for name in model.params:
    same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), model.params[name],
                                        state["params"][name]))
    assert all(same) if name == "encoder" else not any(same), name
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  n_encoder = size(model.params["encoder"])
  assert size(opt.init(model.params)) - size(frozen_opt.init(model.params)) == 2 * n_encoder  # Adam's two moments
  with pytest.raises(ValueError, match=r"train.frozen names 'vision', which holds no parameter.*'decoder'"):
    optimizers.frozen_labels(model.params, ("vision",))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_sharded_step_equals_single_device(tmp_path):
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY, feed_forward_proj="gated-gelu"), tmp_path)
  single = t5x_lite.load(str(tmp_path), progress=False)
  mesh = t5x_lite.make_mesh("data:2,fsdp:2,tensor:2")
  sharded = t5x_lite.load(str(tmp_path), mesh=mesh, progress=False)
  opt, sched = optimizers.make_optimizer("adamw", "cosine")
  step = jax.jit(make_train_step(single.config, opt, sched))
  batch = jax.tree.map(jnp.asarray, _t5_batch(np.random.default_rng(3), B=8))
  s_single, m_single = step(_init(single.config, single.params, opt), batch, None)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda p: _init(single.config, p, opt))(sharded.params)
    s_sharded, m_sharded = step(state, batch, None)
  assert s_sharded["params"]["encoder"]["layers"]["mlp"]["wi_0"].sharding.spec == P(None, "fsdp", "tensor")
  assert float(m_single["loss"]) == pytest.approx(float(m_sharded["loss"]), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s_single["params"],
               jax.device_get(s_sharded["params"]))
