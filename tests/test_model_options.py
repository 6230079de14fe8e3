"""Training-time options of the forward pass: dropout with an explicit key, remat, packed segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite.config import GemmaConfig, T5Config
from t5x_lite.models import gemma, t5
from t5x_lite.models.params import init_params
from t5x_lite.models.registry import family_of_config

T5_SMALL = T5Config(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_encoder_layers=2,
                    num_decoder_layers=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                    mlp_activation="gelu_tanh", mlp_gated=True, tie_lm_head=False, scale_decoder_outputs=False,
                    dropout_rate=0.3)
GEMMA_SMALL = GemmaConfig(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                          num_layers=6, sliding_window=3, query_pre_attn_scalar=8)


def _jit_forward(module):
  return jax.jit(module.forward, static_argnums=1)


T5_FORWARD = _jit_forward(t5)
GEMMA_FORWARD = _jit_forward(gemma)


def _t5_batch():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.integers(2, 64, (2, 9))), jnp.ones((2, 9), jnp.int32),
          jnp.asarray(rng.integers(2, 64, (2, 5))))


def test_dropout_needs_a_key_and_is_deterministic_per_key():
  params = init_params(t5.param_specs(T5_SMALL), jax.random.key(0))
  ids, mask, dec = _t5_batch()
  plain = T5_FORWARD(params, T5_SMALL, ids, mask, dec)
  assert np.array_equal(plain, T5_FORWARD(params, T5_SMALL, ids, mask, dec))  # no key: inference, no dropout
  a = T5_FORWARD(params, T5_SMALL, ids, mask, dec, rng=jax.random.key(1))
  b = T5_FORWARD(params, T5_SMALL, ids, mask, dec, rng=jax.random.key(1))
  c = T5_FORWARD(params, T5_SMALL, ids, mask, dec, rng=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, plain)
  no_dropout = T5_SMALL.replace(dropout_rate=0.0)
  np.testing.assert_array_equal(T5_FORWARD(params, no_dropout, ids, mask, dec, rng=jax.random.key(1)), plain)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(remat):
  config = T5_SMALL.replace(dropout_rate=0.0)
  params = init_params(t5.param_specs(config), jax.random.key(0))
  ids, mask, dec = _t5_batch()

  def loss(p, cfg):
    return jnp.mean(jax.nn.log_softmax(t5.forward(p, cfg, ids, mask, dec))[..., 3])

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  want = grad(params, config)
  got = grad(params, config.replace(remat=remat))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), got, want)


def test_t5_packed_equals_unpacked():
  """Two examples packed in one row (segment ids, restarting positions) give the logits of each alone."""
  config = T5_SMALL.replace(dropout_rate=0.0)
  params = init_params(t5.param_specs(config), jax.random.key(0))
  rng = np.random.default_rng(1)
  enc = [rng.integers(2, 64, n) for n in (5, 4)]
  dec = [rng.integers(2, 64, n) for n in (3, 4)]
  packed_enc = jnp.asarray(np.concatenate(enc))[None]
  packed_dec = jnp.asarray(np.concatenate(dec))[None]
  enc_seg = jnp.asarray([[1] * 5 + [2] * 4])
  dec_seg = jnp.asarray([[1] * 3 + [2] * 4])
  enc_pos = jnp.asarray([list(range(5)) + list(range(4))])
  dec_pos = jnp.asarray([list(range(3)) + list(range(4))])
  packed = T5_FORWARD(params, config, packed_enc, None, packed_dec, encoder_segment_ids_BS=enc_seg,
                      encoder_positions_BS=enc_pos, decoder_segment_ids_BT=dec_seg, decoder_positions_BT=dec_pos)
  alone = [T5_FORWARD(params, config, jnp.asarray(e)[None], None, jnp.asarray(d)[None]) for e, d in zip(enc, dec)]
  np.testing.assert_allclose(packed[0, :3], alone[0][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, 3:], alone[1][0], rtol=1e-5, atol=1e-5)
  # The train step leaves positions out (the bias then comes from slot offsets, equal within each segment).
  batch = {"input_ids": packed_enc, "encoder_segment_ids": enc_seg, "encoder_positions": enc_pos,
           "decoder_input_ids": packed_dec, "decoder_segment_ids": dec_seg, "decoder_positions": dec_pos}
  batch_logits = jax.jit(family_of_config(config).batch_logits, static_argnums=1)
  np.testing.assert_allclose(batch_logits(params, config, batch, None), packed, rtol=1e-5, atol=1e-5)


def test_gemma_packed_equals_unpacked():
  params = init_params(gemma.param_specs(GEMMA_SMALL), jax.random.key(0))
  rng = np.random.default_rng(2)
  seqs = [rng.integers(2, 64, n) for n in (6, 5)]
  packed = GEMMA_FORWARD(params, GEMMA_SMALL, jnp.asarray(np.concatenate(seqs))[None],
                         segment_ids_BT=jnp.asarray([[1] * 6 + [2] * 5]),
                         positions_BT=jnp.asarray([list(range(6)) + list(range(5))]))
  alone = [GEMMA_FORWARD(params, GEMMA_SMALL, jnp.asarray(s)[None]) for s in seqs]
  np.testing.assert_allclose(packed[0, :6], alone[0][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, 6:], alone[1][0], rtol=1e-5, atol=1e-5)
