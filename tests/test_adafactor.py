"""Adafactor as T5X applies it (t5x_lite/training/adafactor.py): a stack of layers updates as each layer would on its
own, second moments are factored over the logical axes (a (L, D, N, H) kernel with N = H = 64 included), and the
factored statistics are sharded like their parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import t5x_lite
from t5x_lite import sharding
from t5x_lite.config import T5Config
from t5x_lite.models import t5
from t5x_lite.models.params import abstract_params, axes_tree
from t5x_lite.training import adafactor as af
from t5x_lite.training import optimizers

L, D, N, H, F, V, X = 3, 128, 4, 64, 256, 384, 8
AXES = {"q": ("layers", "embed", "heads", "kv"), "o": ("layers", "heads", "kv", "embed"),
        "wi": ("layers", "embed", "mlp"), "norm": ("layers", "norm"), "embedding": ("vocab", "embed"),
        "relpos": ("relpos_buckets", "heads"), "final_norm": ("norm",)}
SHAPES = {"q": (L, D, N, H), "o": (L, N, H, D), "wi": (L, D, F), "norm": (L, D), "embedding": (V, D),
          "relpos": (X, N), "final_norm": (D,)}
# Each layer of a stack as the 2-D (or 1-D) matrix T5X factors: input features x output features.
AS_MATRIX = {"q": (D, N * H), "o": (N * H, D), "wi": (D, F), "norm": (D,)}


def _tree(rng, layer_scales):
  """A params-like tree; stacked leaves get a different scale per layer, so that pooling layers would show."""
  out = {}
  for name, shape in SHAPES.items():
    x = rng.normal(size=shape)
    if name in AS_MATRIX:
      x = x * np.asarray(layer_scales).reshape((L,) + (1,) * (len(shape) - 1))
    out[name] = jnp.asarray(x, jnp.float32)
  return out


def _per_layer(tree):
  """Each stacked leaf split into its layers, each as its matrix; the rest as they are."""
  out = {}
  for name, x in tree.items():
    if name in AS_MATRIX:
      out.update({f"{name}/{layer}": x[layer].reshape(AS_MATRIX[name]) for layer in range(L)})
    else:
      out[name] = x
  return out


def _stacked(per_layer, name):
  return np.stack([np.asarray(per_layer[f"{name}/{layer}"]).reshape(SHAPES[name][1:]) for layer in range(L)])


def test_a_stack_updates_as_each_layer_would_on_its_own():
  """Three steps of our Adafactor on stacked params equal optax.adafactor (the Adafactor of the paper, which T5X's
  is for a matrix) run on every layer's kernel as its own (input features x output features) matrix: per-layer row
  and column statistics, update clipping and parameter scale. optax.adafactor on the stacked tree itself differs."""
  rng = np.random.default_rng(0)
  params = _tree(rng, [1.0, 3.0, 0.1])
  schedule = lambda count: 0.1 / jnp.sqrt(count + 1.0)  # noqa: E731
  ours = af.adafactor(schedule, param_axes=AXES)
  reference = optax.adafactor(schedule)
  pooled = optax.adafactor(schedule)
  state, ref_state, pooled_state = ours.init(params), reference.init(_per_layer(params)), pooled.init(params)
  p, ref_p = params, _per_layer(params)
  update = jax.jit(ours.update)
  for _ in range(3):
    grads = _tree(rng, [1.0, 10.0, 0.01])
    u, state = update(grads, state, p)
    ref_u, ref_state = reference.update(_per_layer(grads), ref_state, ref_p)
    pooled_u, pooled_state = pooled.update(grads, pooled_state, p)
    for name in SHAPES:
      want = _stacked(ref_u, name) if name in AS_MATRIX else ref_u[name]
      np.testing.assert_allclose(u[name], want, rtol=2e-5, atol=1e-9, err_msg=name)
    assert not np.allclose(u["q"], pooled_u["q"], rtol=1e-2)  # one RMS over all layers is not T5X's update
    p, ref_p = optax.apply_updates(p, u), optax.apply_updates(ref_p, ref_u)


def _t5x_reference(param, grads, lr, *, momentum, weight_decay_rate, batch=(0,), rows=(1,), cols=(2, 3)):
  """T5X's `apply_param_gradient` for one parameter with a (BATCH, ROW, COLUMN, COLUMN) rule, in numpy, written out
  from its rules (decay 1 - t^-0.8, epsilon1 1e-30, epsilon2 1e-3, clipping 1.0, parameter scale on)."""
  averaging = tuple(d for d in range(param.ndim) if d not in batch)
  v_row = v_col = m = None
  updates = []
  for t, g in enumerate(grads, start=1):
    decay = 1.0 - t ** -0.8
    g2 = g * g + 1e-30
    row, col = g2.mean(axis=cols, keepdims=True), g2.mean(axis=rows, keepdims=True)
    v_row = row if v_row is None else decay * v_row + (1 - decay) * row
    v_col = col if v_col is None else decay * v_col + (1 - decay) * col
    y = g / np.sqrt(v_row / v_row.mean(axis=rows, keepdims=True) * v_col)
    y = y / np.maximum(1.0, np.sqrt((y * y).mean(axis=averaging, keepdims=True)) / 1.0)
    step = lr * np.maximum(np.sqrt((param * param).mean(axis=averaging, keepdims=True)), 1e-3) * y
    m = (1 - momentum) * step if m is None else momentum * m + (1 - momentum) * step
    update = -m - weight_decay_rate * param
    updates.append(update)
    param = param + update
  return updates


def test_momentum_and_weight_decay_follow_t5x():
  rng = np.random.default_rng(1)
  param = rng.normal(size=(2, D, N, H)) * np.array([1.0, 5.0])[:, None, None, None]
  grads = [rng.normal(size=param.shape) for _ in range(3)]
  opt = af.adafactor(0.05, param_axes={"w": AXES["q"]}, momentum=0.9, weight_decay_rate=1e-3)
  p = {"w": jnp.asarray(param, jnp.float32)}
  state = opt.init(p)
  for g, want in zip(grads, _t5x_reference(param, grads, 0.05, momentum=0.9, weight_decay_rate=1e-3)):
    u, state = opt.update({"w": jnp.asarray(g, jnp.float32)}, state, p)
    # Against the step's scale: where momentum and weight decay nearly cancel, float32 keeps only their rounding.
    np.testing.assert_allclose(u["w"], want, rtol=5e-5, atol=1e-5 * np.abs(want).max())
    p = optax.apply_updates(p, u)
  assert state.m["w"].shape == param.shape and state.v["w"].shape == (1, 1, 1, 1)


def _xxl() -> T5Config:
  """t5-v1_1-xxl's shape (11 B parameters)."""
  return T5Config(vocab_size=32128, d_model=4096, num_heads=64, head_dim=64, d_ff=10240, num_encoder_layers=24,
                  num_decoder_layers=24, mlp_activation="gelu_tanh", mlp_gated=True, tie_lm_head=False,
                  scale_decoder_outputs=False)


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_attention_kernels_of_64_heads_of_64_are_factored():
  """t5-v1_1-xxl: each (24, 4096, 64, 64) attention kernel keeps (24, 4096) row and (24, 64, 64) column statistics;
  optax.adafactor kept all of it (its two largest axes, 4096 and 64, are not both >= 128)."""
  specs = t5.param_specs(_xxl())
  params = abstract_params(specs)
  ours = jax.eval_shape(optimizers.make_optimizer("adafactor", param_axes=axes_tree(specs))[0].init, params)
  q = ("encoder", "layers", "attn", "q")
  get = lambda tree: tree[q[0]][q[1]][q[2]][q[3]]  # noqa: E731
  assert get(params).shape == (24, 4096, 64, 64)
  assert (get(ours.v_row).shape, get(ours.v_col).shape, get(ours.v).shape) == (
      (24, 4096, 1, 1), (24, 1, 64, 64), (1, 1, 1, 1))
  n_params = _size(params)
  assert n_params == 11_135_332_352
  # Hand count of the factored state (float32 entries): per layer, each attention kernel D + N*H and each MLP kernel
  # D + F (encoder: 4 + 3 kernels, decoder: 8 + 3); embedding and head V + D each; in full the (L, D) layer norms
  # (encoder 2, decoder 3 per layer), the final norms (D) and the relpos tables (32 x 64); placeholders of one
  # entry for the slots a parameter does not use: v and m of the 20 factored ones, v_row, v_col and m of the 9
  # others; and the step count.
  Dm, NH, Ff, Vv, Ll = 4096, 64 * 64, 10240, 32128, 24
  kernels = Ll * (4 * (Dm + NH) + 3 * (Dm + Ff)) + Ll * (8 * (Dm + NH) + 3 * (Dm + Ff)) + 2 * (Vv + Dm)
  full = Ll * (2 + 3) * Dm + 2 * Dm + 2 * 32 * 64
  hand = kernels + full + (2 * 20 + 3 * 9) + 1
  assert _size(ours) == hand == 5_000_004  # 20 MB, against 4.8 G entries (19 GB) of optax.adafactor
  before = _size(jax.eval_shape(optax.adafactor(1e-3).init, params))
  assert before > 4.8e9  # optax.adafactor: the attention kernels' whole second moments


def test_factored_statistics_are_sharded_like_their_parameters():
  """follow_params gives a statistic its parameter's sharding on the axes it keeps, and puts the mesh axes of the
  axes it reduced on its largest free axis: on fsdp:64 the (24, 1, 64, 64) column statistics of a kernel sharded
  over D are spread 1/64 per device too (here on an abstract mesh: no 64 devices needed)."""
  mesh = AbstractMesh((1, 64, 1), sharding.MESH_AXES)
  specs = t5.param_specs(_xxl())
  axes = axes_tree(specs)
  shardings = jax.tree.map(lambda a, s: NamedSharding(mesh, sharding.logical_to_spec(a, s.shape, dict(mesh.shape))),
                           axes, specs, is_leaf=lambda a: isinstance(a, tuple))
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=sh), abstract_params(specs),
                        shardings)
  state = jax.eval_shape(optimizers.make_optimizer("adafactor", param_axes=axes)[0].init, params)
  placed = sharding.follow_params(state, params)
  q = lambda tree: tree["encoder"]["layers"]["attn"]["q"]  # noqa: E731
  o = lambda tree: tree["decoder"]["layers"]["cross_attn"]["o"]  # noqa: E731
  assert q(params).sharding.spec == P(None, "fsdp", None, None)
  assert q(placed.v_row).spec == P(None, "fsdp", None, None)
  assert q(placed.v_col).spec == P(None, None, "fsdp", None)
  assert q(placed.v_col).shard_shape((24, 1, 64, 64)) == (24, 1, 1, 64)
  assert o(placed.v_row).spec == P(None, None, None, "fsdp") and o(placed.v_col).spec == P(None, "fsdp", None, None)
  assert placed.count.spec == P()
  per_device = sum(math.prod(sh.shard_shape(x.shape)) * 4 for x, sh in zip(jax.tree.leaves(state),
                                                                            jax.tree.leaves(placed)))
  # What stays whole on every device: the (L, D) norm scales' second moments, replicated as the norms are.
  norms = (24 * 2 + 24 * 3) * 4096 * 4 + 2 * 4096 * 4
  assert norms < per_device < norms + 400_000, per_device


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_sharded_update_equals_unsharded():
  """Inside jit on params sharded over data:2,fsdp:2,tensor:2, with the state placed by follow_params (and kept
  there by the update), one step equals the unsharded one."""
  mesh = t5x_lite.make_mesh("data:2,fsdp:2,tensor:2")
  rng = np.random.default_rng(2)
  params = _tree(rng, [1.0, 2.0, 0.5])
  grads = _tree(rng, [1.0, 3.0, 0.2])
  opt = af.adafactor(0.01, param_axes=AXES, min_dim_size_to_factor=8)
  want_u, want_state = opt.update(grads, opt.init(params), params)
  shardings = {k: sharding.named_sharding(mesh, AXES[k], SHAPES[k]) for k in SHAPES}
  params_s, grads_s = jax.device_put(params, shardings), jax.device_put(grads, shardings)
  state_shardings = sharding.follow_params(jax.eval_shape(opt.init, params_s), params_s)
  assert state_shardings.v_col["q"].spec == P(None, None, "tensor", "fsdp")  # (3, 1, 4, 64): fsdp freed by D
  state = jax.jit(opt.init, out_shardings=state_shardings)(params_s)
  u, new_state = jax.jit(opt.update, out_shardings=(shardings, state_shardings))(grads_s, state, params_s)
  for name in SHAPES:
    np.testing.assert_allclose(u[name], want_u[name], rtol=1e-5, atol=1e-9, err_msg=name)
  np.testing.assert_allclose(new_state.v_row["q"], want_state.v_row["q"], rtol=1e-5)


def test_rules_and_mistakes():
  rule = af.factor_rule("q", (L, D, N, H), AXES["q"])
  assert (rule.batch, rule.rows, rule.cols, rule.averaging(4)) == ((0,), (1,), (2, 3), (1, 2, 3))
  assert not af.factor_rule("q", (L, 32, 4, 8), AXES["q"]).factored  # 32 input features: below 128
  assert not af.factor_rule("q", (L, D, N, H), AXES["q"], factored=False).factored
  assert af.factor_rule("norm", (L, D), AXES["norm"]) == af.FactorRule(batch=(0,))  # per layer, unfactored
  # 2-D without a layer axis: T5X's heuristic, the larger axis the column one.
  assert af.factor_rule("embedding", (V, D), AXES["embedding"]) == af.FactorRule(batch=(), rows=(1,), cols=(0,))
  assert not af.factor_rule("relpos", (X, N), AXES["relpos"]).factored
  with pytest.raises(ValueError, match=r"parameter w has logical axis 'act_batch', which has no factoring rule"):
    af.factor_rule("w", (L, D), ("layers", "act_batch"))
  with pytest.raises(ValueError, match=r"w \(3, 128, 4, 64\) has rank 4 and no logical axes.*param_axes"):
    af.adafactor(0.1).init({"w": jnp.zeros((L, D, N, H))})
  with pytest.raises(ValueError, match=r"mixes factored and unfactored axes"):
    af.factor_rule("w", (L, D, X, N), ("layers", "embed", "relpos_buckets", "heads"))
  with pytest.raises(ValueError, match=r"adafactor.clipping_threshold must be > 0"):
    optimizers.adafactor(optimizers.rsqrt_schedule(), clipping_threshold=0.0)


def test_frozen_parameters_hold_no_state():
  """Under optax.multi_transform (train.frozen) the Adafactor sees a masked tree and keeps no statistics for it."""
  rng = np.random.default_rng(3)
  params = {"a": _tree(rng, [1.0, 1.0, 1.0]), "b": _tree(rng, [1.0, 1.0, 1.0])}
  axes = {"a": AXES, "b": AXES}
  labels = optimizers.frozen_labels(params, ("b",))
  opt = optimizers.with_frozen(af.adafactor(0.01, param_axes=axes), labels)
  state = opt.init(params)
  u, _ = jax.jit(opt.update)(params, state, params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u["b"]))
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(u["a"]))
  assert _size(state) == _size(af.adafactor(0.01, param_axes=axes).init({"a": params["a"]}))


class _CharTokenizer:
  eos_id = 1

  def encode(self, text):
    return [3 + ord(c) % 125 for c in text]


def test_a_run_saved_with_the_previous_adafactor_state_is_refused_by_name(tmp_path, monkeypatch):
  """A workdir whose checkpoints hold optax.adafactor's state (t5x_lite before this Adafactor) does not resume: one
  ValueError says the optimizer state does not fit and how to go on from its weights, not orbax's tree mismatch
  reported as an unreadable checkpoint."""
  from t5x_lite.data.pipeline import DataConfig  # pylint: disable=import-outside-toplevel
  from t5x_lite.training.loop import train  # pylint: disable=import-outside-toplevel
  config = T5Config(vocab_size=128, d_model=32, num_heads=2, head_dim=16, d_ff=64, num_encoder_layers=1,
                    num_decoder_layers=1)
  documents = [{"inputs": f"question {i}", "targets": f"{2 * i}"} for i in range(32)]

  def run(steps):
    data = DataConfig(objective="seq2seq", batch_size=8, inputs_length=16, targets_length=8, prefetch=0)
    return train(str(tmp_path), model=config, data=data, tokenizer=_CharTokenizer(), documents=documents,
                 train_steps=steps, save_every=1, log_every=1, async_checkpoints=False, progress=False)

  with monkeypatch.context() as patch:
    patch.setattr(optimizers, "make_optimizer", lambda name, schedule, param_axes=None: (
        optax.adafactor(optimizers.rsqrt_schedule()), optimizers.rsqrt_schedule()))
    run(1)
  with pytest.raises(ValueError, match=r"checkpoint step 1 in .*: its optimizer state does not fit this run's "
                                       r"optimizer \(.*only in the checkpoint.*T5X-style Adafactor.*init_params_from"):
    run(2)
