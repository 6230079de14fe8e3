"""Sharded equals unsharded on 8 host CPU devices, and the logical-axis rules behave."""

import jax
import numpy as np
import pytest
import transformers as tf
from conftest import T5_TINY, build_hf, untie_lm_head
from jax.sharding import PartitionSpec as P

import t5x_lite
from t5x_lite import sharding

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS host device count)")


def assert_close_at_scale(actual, desired, rel=5e-6):
  """Sharded vs single-device float32 results: the reductions split differently across devices, so they agree
  to summation-order noise measured against the tensor's scale (max |desired|), not per element (measured:
  1.3e-6 of the logit scale)."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=0, atol=rel * float(np.abs(desired).max()))


def test_mesh_from_spec():
  mesh = t5x_lite.make_mesh("data:2,fsdp:2,tensor:2")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(t5x_lite.make_mesh("tensor:8").shape) == {"data": 1, "fsdp": 1, "tensor": 8}
  with pytest.raises(ValueError, match="needs 4 devices but 8"):
    t5x_lite.make_mesh("data:4")
  with pytest.raises(ValueError, match="bad mesh spec 'data=2'"):
    t5x_lite.make_mesh("data=2")
  with pytest.raises(ValueError, match="AXIS:SIZE"):
    t5x_lite.make_mesh("model:8")


def test_rules_fall_back_to_replication():
  mesh_shape = {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.logical_to_spec(("layers", "embed", "heads", "kv"), (3, 32, 4, 8), mesh_shape) == \
      P(None, "fsdp", "tensor", None)
  # 3 heads do not divide tensor:2 -> replicated on that dimension, the rest stays sharded.
  assert sharding.logical_to_spec(("layers", "embed", "heads", "kv"), (3, 32, 3, 8), mesh_shape) == \
      P(None, "fsdp", None, None)
  # a mesh axis is used at most once
  assert sharding.logical_to_spec(("embed", "embed"), (32, 32), mesh_shape) == P("fsdp", None)
  # batch over data and fsdp together, or not at all
  assert sharding.logical_to_spec(("act_batch", "act_length"), (8, 5), mesh_shape) == P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("act_batch", "act_length"), (2, 5), mesh_shape) == P(None, None)


MESHES = ["data:2,fsdp:2,tensor:2", "tensor:8", "fsdp:8", "data:4,tensor:2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  d = tmp_path_factory.mktemp("hf")
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY, feed_forward_proj="gated-gelu",
                                                       tie_word_embeddings=False), d)
  untie_lm_head(tf.T5ForConditionalGeneration, d)
  return str(d)


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_logits_equal_unsharded(checkpoint, spec):
  rng = np.random.default_rng(1)
  ids = rng.integers(3, 128, (4, 12))
  mask = np.ones_like(ids)
  mask[2, 9:] = 0
  dec = rng.integers(3, 128, (4, 6))
  single = t5x_lite.load(checkpoint, progress=False)
  mesh = t5x_lite.make_mesh(spec)
  sharded = t5x_lite.load(checkpoint, mesh=mesh, progress=False)
  q = sharded.params["encoder"]["layers"]["attn"]["q"]  # (L, D=32, N=4, H=8)
  expect = sharding.logical_to_spec(("layers", "embed", "heads", "kv"), q.shape, dict(mesh.shape))
  assert q.sharding.spec == expect
  if spec == "tensor:8":
    assert expect == P(None, None, None, None)  # 4 heads on 8 devices: replicated, not an error
    assert sharded.params["encoder"]["layers"]["mlp"]["wi_0"].sharding.spec == P(None, None, "tensor")
  assert_close_at_scale(sharded.logits(ids, mask, dec), single.logits(ids, mask, dec))
  assert_close_at_scale(sharded.encode(ids, mask), single.encode(ids, mask))


def test_orbax_checkpoint_restores_sharded(checkpoint, tmp_path):
  ids = np.random.default_rng(2).integers(3, 128, (8, 10))
  dec = ids[:, :5]
  single = t5x_lite.load(checkpoint, progress=False)
  single.save(str(tmp_path / "ckpt"))
  mesh = t5x_lite.make_mesh("data:2,fsdp:2,tensor:2")
  restored = t5x_lite.load(str(tmp_path / "ckpt"), mesh=mesh)
  assert restored.params["decoder"]["layers"]["mlp"]["wo"].sharding.spec == P(None, "tensor", "fsdp")
  assert_close_at_scale(restored.logits(ids, None, dec), single.logits(ids, None, dec))


@pytest.fixture(scope="module")
def gemma_checkpoint(tmp_path_factory):
  d = tmp_path_factory.mktemp("gemma")
  config = tf.Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24,
                               sliding_window=4)
  build_hf(tf.Gemma3ForCausalLM, config, d)
  return str(d)


@pytest.mark.parametrize("spec", MESHES)
def test_gemma_sharded_equals_unsharded(gemma_checkpoint, spec):
  """MQA: 1 kv head on a tensor axis of 2 or 8 is replicated, not an error."""
  rng = np.random.default_rng(3)
  ids = rng.integers(3, 128, (8, 11))
  mask = np.ones_like(ids)
  mask[3, :4] = 0
  single = t5x_lite.load(gemma_checkpoint, progress=False)
  mesh = t5x_lite.make_mesh(spec)
  sharded = t5x_lite.load(gemma_checkpoint, mesh=mesh, progress=False)
  assert sharded.params["layers"]["attn"]["k"].sharding.spec[2] is None  # kv heads replicated
  assert_close_at_scale(sharded.logits(ids, mask), single.logits(ids, mask))


def test_optimizer_state_follows_its_params():
  """Adam's moments take their param's sharding, Adafactor's factored statistics it less the reduced dimension,
  counts are replicated (XLA's propagation replicated the whole optimizer state)."""
  import optax  # pylint: disable=import-outside-toplevel
  mesh = t5x_lite.make_mesh("data:2,fsdp:2,tensor:2")
  shape = (256, 128, 64)  # Adafactor factors dimensions of 128 and more
  params = {"w": jax.ShapeDtypeStruct(shape, np.float32,
                                      sharding=sharding.named_sharding(mesh, ("embed", None, "mlp"), shape)),
            "b": jax.ShapeDtypeStruct((4,), np.float32, sharding=sharding.named_sharding(mesh, ("mlp",), (4,)))}
  adam = sharding.follow_params(jax.eval_shape(optax.adam(1e-3).init, params), params)
  assert adam[0].mu["w"].spec == P("fsdp", None, "tensor") and adam[0].nu["b"].spec == P("tensor")
  assert adam[0].count.spec == P()
  factored = sharding.follow_params(jax.eval_shape(optax.adafactor(1e-3).init, params), params)
  leaves = {jax.tree_util.keystr(k): v.spec for k, v in jax.tree_util.tree_leaves_with_path(factored)}
  v_row = next(spec for key, spec in leaves.items() if "v_row['w']" in key)
  v_col = next(spec for key, spec in leaves.items() if "v_col['w']" in key)
  assert (v_row, v_col) == (P(None, "tensor"), P("fsdp", "tensor")), leaves  # (128, 64) and (256, 64)
  assert leaves["[0].v['b']"] == P("tensor")  # too small to factor: the full second moment


def test_hybrid_mesh_spec():
  """DCN factors multiply their axis (the logical-axis rules see data, fsdp, tensor only); on one process, a DCN
  factor above 1 is refused naming the process count (processes are the slices of a CPU run)."""
  assert sharding.parse_mesh_spec("dcn_data:2,fsdp:2,tensor:2") == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.parse_hybrid_spec("dcn_data:2,data:2,tensor:2") == ({"data": 2, "fsdp": 1, "tensor": 2},
                                                                      {"data": 2, "fsdp": 1, "tensor": 1})
  assert dict(t5x_lite.make_mesh("dcn_data:1,fsdp:4,tensor:2").shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  with pytest.raises(ValueError, match="DCN factors multiply to 2 but the devices form 1 processes"):
    t5x_lite.make_mesh("dcn_data:2,fsdp:2,tensor:2")
  with pytest.raises(ValueError, match="each once"):
    t5x_lite.make_mesh("data:2,data:4")
  with pytest.raises(ValueError, match="dcn_AXIS"):
    t5x_lite.make_mesh("dcn_model:2")
