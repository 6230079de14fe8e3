"""The checklist every registered model family passes, for every task it supports: the hooks of
t5x_lite/models/family.py do what they promise. A new family joins by registering (models/registry.py) and adding
its tiny configs to TINY; the first test fails until it does.

Per (family, task): forward shapes; encode where the family has an encoder (and a clear refusal where not); a
decoding step equal to the forward pass' last position, twice (lm); a training batch's logits equal to the
forward pass; ours -> t5x_lite checkpoint -> ours and ours -> HF -> ours bit-identical, with transformers loading
the export with no missing or unexpected tensor and counting the parameters the specs declare; sharded on
data:2,fsdp:2,tensor:2 == unsharded.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from conftest import assert_close_to_hf

import t5x_lite
from t5x_lite.config import GemmaConfig, SiglipVisionConfig, T5Config, T5Gemma2Config
from t5x_lite.data import packing
from t5x_lite.model import Model
from t5x_lite.models.params import count_params, init_params
from t5x_lite.models.registry import FAMILIES, family_of_config

# Tiny shapes with the quirks that catch mistakes: unequal encoder/decoder depth, an untied head, GQA, sliding
# windows shorter than the sequence, query_pre_attn_scalar != head_dim, a final soft-cap.
_T5 = T5Config(vocab_size=128, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_encoder_layers=2,
               num_decoder_layers=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
               mlp_activation="gelu_tanh", mlp_gated=True, tie_lm_head=False, scale_decoder_outputs=False)
_GEMMA = GemmaConfig(vocab_size=128, d_model=32, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=64, num_layers=3,
                     layer_types=("sliding_attention", "sliding_attention", "full_attention"), sliding_window=4,
                     query_pre_attn_scalar=24, final_logit_softcap=30.0)
_STACK = dict(vocab_size=300, d_model=32, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=64, sliding_window=4,
              query_pre_attn_scalar=24, rope_scaling=8.0)
_T5GEMMA2 = T5Gemma2Config(
    encoder=GemmaConfig(**_STACK, num_layers=3,
                        layer_types=("sliding_attention", "full_attention", "sliding_attention")),
    decoder=GemmaConfig(**_STACK, num_layers=2, layer_types=("sliding_attention", "full_attention"),
                        final_logit_softcap=30.0),
    vision=SiglipVisionConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, image_size=8,
                              patch_size=4),
    mm_tokens_per_image=4, boi_token_index=255, eoi_token_index=256, image_token_index=257)
TINY = {
    "t5": {task: _T5.replace(task=task) for task in ("lm", "encoder", "seq_cls", "token_cls", "qa")},
    # transformers has Gemma 3 (text) models for lm and seq_cls; token classification as Gemma 2 has it.
    "gemma": {"lm": _GEMMA, "seq_cls": _GEMMA.replace(task="seq_cls"),
              "token_cls": _GEMMA.replace(task="token_cls", model_type="gemma2", qk_norm=False, attn_logit_softcap=50.0,
                                          rope_theta=10_000.0, rope_local_theta=10_000.0)},
    "t5gemma2": {task: _T5GEMMA2.replace(task=task) for task in ("lm", "seq_cls", "token_cls")},
}
CASES = [(family, task) for family, tasks in TINY.items() for task in tasks]
B, S, T = 2, 9, 5


def test_every_registered_family_has_tiny_configs():
  assert set(TINY) == set(FAMILIES)


LM_CASES = [(family, task) for family, task in CASES if task == "lm"]
LOGIT_CASES = [(family, task) for family, task in CASES if task != "encoder"]


@functools.cache
def _built(family_name: str, task: str):
  config = TINY[family_name][task]
  family = family_of_config(config)
  params = init_params(family.param_specs(config), jax.random.key(0))
  # Perturbed away from init patterns (ones, zeros), so that a swapped or skipped tensor shows.
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), params)
  return config, family, params


def _ids(cases):
  return [f"{family}-{task}" for family, task in cases]


@pytest.fixture(params=CASES, ids=_ids(CASES))
def case(request):
  return _built(*request.param)


@pytest.fixture(params=LM_CASES, ids=_ids(LM_CASES))
def lm_case(request):
  return _built(*request.param)


@pytest.fixture(params=LOGIT_CASES, ids=_ids(LOGIT_CASES))
def logit_case(request):
  return _built(*request.param)


def _inputs(config):
  """(B, S) ids ending in EOS (sequence classification reads it), row 1 padded: on the right for an
  encoder-decoder, else on the left (as a decoder-only prompt; an encoder reads either)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, config.vocab_size, (B, S)).astype(np.int32)
  mask = np.ones_like(ids)
  ids[:, -1] = config.eos_token_id
  if config.is_encoder_decoder:
    ids[1, 6:], mask[1, 6:] = config.pad_token_id, 0
    ids[1, 5] = config.eos_token_id
  else:
    ids[1, :3], mask[1, :3] = config.pad_token_id, 0
  # Decoder inputs for a language model; the other encoder-decoder heads decode the shifted inputs.
  decoder = rng.integers(3, config.vocab_size, (B, T)).astype(np.int32) if config.task == "lm" and \
      config.is_encoder_decoder else None
  return ids, mask, decoder


def _forward_args(config, ids, mask, decoder):
  return (ids, mask, decoder, None) if config.is_encoder_decoder else (ids, mask)


def _expected_shape(config):
  labels = config.num_labels
  return {"lm": (B, T if config.is_encoder_decoder else S, config.vocab_size), "seq_cls": (B, labels),
          "token_cls": (B, S, labels), "qa": (B, S, labels), "encoder": (B, S, config.d_model)}[config.task]


def test_forward_shapes_and_encode(case):
  config, family, params = case
  ids, mask, decoder = _inputs(config)
  out = family.forward(params, config, *_forward_args(config, ids, mask, decoder))
  assert out.shape == _expected_shape(config) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  model = Model(config, params)
  if family.encode is None:
    with pytest.raises(ValueError, match="decoder-only: it has no encoder"):
      model.encode(ids, mask)
    return
  encoded = model.encode(ids, mask)
  assert encoded.shape == (B, S, config.d_model)
  if config.task == "encoder":
    assert_close_to_hf(encoded, out)


def test_decoding_steps_equal_the_forward_pass(lm_case):
  config, family, params = lm_case
  ids, mask, _ = _inputs(config)
  decoder = family.decoder(params, config, jnp.asarray(ids), jnp.asarray(mask), 1, 4)
  if config.is_encoder_decoder:
    def forward_last(generated):
      start = np.full((B, 1), config.decoder_start_token_id, np.int32)
      return family.forward(params, config, ids, mask, np.concatenate([start, generated], 1), None)[:, -1]
    logits, state = decoder.step(decoder.first_tokens_R, decoder.state, jnp.int32(0))
    t = 1
  else:
    def forward_last(generated):
      return family.forward(params, config, np.concatenate([ids, generated], 1),
                            np.concatenate([mask, np.ones_like(generated)], 1))[:, -1]
    logits, state, t = decoder.first_logits_RV, decoder.state, 1
  generated = np.zeros((B, 0), np.int32)
  for _ in range(2):
    assert_close_to_hf(logits, forward_last(generated))
    token = np.asarray(jnp.argmax(logits, -1), np.int32)
    generated = np.concatenate([generated, token[:, None]], 1)
    logits, state = decoder.step(jnp.asarray(token), state, jnp.int32(t))
    t += 1


def test_training_batch_logits_equal_the_forward_pass(lm_case):
  config, family, params = lm_case
  ids, mask, decoder = _inputs(config)
  rows = [ids[b][mask[b] == 1].tolist() for b in range(B)]
  if config.is_encoder_decoder:
    batch = packing.pack_encoder_decoder(zip(rows, decoder.tolist()), inputs_length=S, targets_length=T, pack=False,
                                         start_id=config.decoder_start_token_id)
    expected = family.forward(params, config, batch["input_ids"], (batch["encoder_segment_ids"] > 0).astype(np.int32),
                              batch["decoder_input_ids"], None)
    weights = batch["decoder_loss_weights"] > 0
  else:
    batch = packing.pack_decoder_only([([], r) for r in rows], length=S, pack=False,
                                      start_id=getattr(config, "bos_token_id", 0))
    expected = family.forward(params, config, batch["input_ids"], (batch["segment_ids"] > 0).astype(np.int32))
    weights = batch["loss_weights"] > 0
  got = family.batch_logits(params, config, batch, None)
  assert_close_to_hf(np.asarray(got)[weights], np.asarray(expected)[weights])
  flops = family.forward_flops_per_token(config)
  assert flops and all(key in batch and value > 0 for key, value in flops.items())


def test_save_load_and_hf_round_trip_with_the_declared_parameter_count(case, tmp_path):
  config, family, params = case
  model = Model(config, params)
  declared = count_params(family.param_specs(config))
  assert sum(x.size for x in jax.tree.leaves(params)) == declared
  model.save(str(tmp_path / "ours"))
  model.save_hf(str(tmp_path / "hf"))
  for path in ("ours", "hf"):
    loaded = t5x_lite.load(str(tmp_path / path), progress=False)
    assert loaded.config == dataclasses.replace(config, hf_extra_json=loaded.config.hf_extra_json)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded.params, params)
  architecture = json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"][0]
  hf_model, info = getattr(tf, architecture).from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert hf_model.num_parameters() == declared


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS host device count)")
def test_sharded_equals_unsharded(logit_case):
  config, family, params = logit_case
  ids, mask, decoder = _inputs(config)
  single = Model(config, params).logits(ids, mask, decoder)
  mesh = t5x_lite.make_mesh("data:2,fsdp:2,tensor:2")
  from t5x_lite import sharding  # pylint: disable=import-outside-toplevel
  from t5x_lite.models.params import axes_tree  # pylint: disable=import-outside-toplevel
  specs = family.param_specs(config)
  sharded_params = jax.device_put(params, sharding.tree_shardings(mesh, axes_tree(specs), specs))
  sharded = Model(config, sharded_params, mesh=mesh).logits(ids, mask, decoder)
  np.testing.assert_allclose(sharded, single, rtol=0, atol=5e-6 * float(np.abs(single).max()))


def test_adafactor_knows_every_parameter(case):
  """Every parameter's logical axes have an Adafactor factoring role (training/adafactor.py LOGICAL_FACTOR_RULES),
  without a ROW + COLUMN + unfactored mix; with min_dim_size_to_factor 1 every kernel with input and output axes
  is factored, over a layer axis where it has one."""
  from t5x_lite.models.params import axes_tree  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import adafactor  # pylint: disable=import-outside-toplevel
  config, family, params = case
  opt = adafactor.adafactor(0.1, param_axes=axes_tree(family.param_specs(config)), min_dim_size_to_factor=1)
  state = jax.eval_shape(opt.init, params)
  kernels = [x for x in jax.tree.leaves(state.v_row) if x.shape != (1,) * len(x.shape)]
  assert kernels, "no parameter was factored"


def test_activation_stacks_cover_every_stacked_layer(case):
  """Family.activation_stacks (memory estimates, training/memory.py) names every stack of layers of the specs by its
  params path, with its depth, for the lengths of the batch features forward_flops_per_token counts (and the vision
  tower's with image slots)."""
  from t5x_lite.models.params import is_spec  # pylint: disable=import-outside-toplevel
  config, family, _ = case
  lengths = {key: 7 + i for i, key in enumerate(family.forward_flops_per_token(config))}
  stacks = family.activation_stacks(config, {**lengths, "images": 2})
  groups = {}
  for path, spec in jax.tree_util.tree_leaves_with_path(family.param_specs(config), is_leaf=is_spec):
    if spec.axes[0] == "layers":
      keys = [str(getattr(k, "key", k)) for k in path]
      groups["/".join(keys[:keys.index("layers") + 1])] = spec.shape[0]
  assert {s.path: s.num_layers for s in stacks} == groups
  for s in stacks:
    assert s.length > 0 and s.d_model > 0 and s.mlp_dim > 0 and s.attention and s.rows >= 1
    assert all(a.keys > 0 and a.heads % a.kv_heads == 0 for a in s.attention)
