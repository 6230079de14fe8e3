"""Weight-only quantized models (`t5x_lite.load(..., quantize="int8" | "bfloat16")`): a model trained here keeps its
greedy tokens and logits within the stated tolerance; every family loads quantized and runs logits, encode, generate
(greedy, sample, beam) and score as a float model holding the rounded weights does, sharded as unsharded, with either
dequantization mode; the params really are int8; infer.py --quantize runs and is part of its run record."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_family_conformance import TINY, _built

import t5x_lite
from t5x_lite import generation
from t5x_lite import quantize as quantize_lib
from t5x_lite.config import GemmaConfig, T5Config
from t5x_lite.model import Model
from t5x_lite.models.params import init_params
from t5x_lite.models.registry import family_of_config
from t5x_lite.nn import quant
from t5x_lite.training.step import loss_sums

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The stated tolerance (README, t5x_lite/quantize.py): max |logit - float32 logit| <= TOL x max |float32 logit|.
LOGIT_TOL = {"int8": 0.02, "bfloat16": 0.01}
V = 64


# -------------------------------------------------------------------------------------- a trained model

def _chains(rng, rows: int, length: int, perm: np.ndarray, noise: float = 0.15) -> np.ndarray:
  """Sequences over [3, V) where each token is perm[previous] (with probability 1 - noise; else any token)."""
  out = np.empty((rows, length), np.int32)
  out[:, 0] = rng.integers(3, V, rows)
  for t in range(1, length):
    follow = rng.random(rows) >= noise
    out[:, t] = np.where(follow, perm[out[:, t - 1]], rng.integers(3, V, rows))
  return out


def _batch(config, seqs: np.ndarray) -> dict:
  B, L = seqs.shape
  ones, positions = np.ones((B, L - 1), np.int32), np.tile(np.arange(L - 1, dtype=np.int32), (B, 1))
  if config.is_encoder_decoder:  # the encoder reads the chain's first token 8 times; the decoder writes the rest
    S = 8
    return {"input_ids": np.repeat(seqs[:, :1], S, axis=1), "encoder_segment_ids": np.ones((B, S), np.int32),
            "encoder_positions": np.tile(np.arange(S, dtype=np.int32), (B, 1)),
            "decoder_input_ids": np.concatenate([np.zeros((B, 1), np.int32), seqs[:, 1:-1]], axis=1),
            "decoder_target_ids": seqs[:, 1:], "decoder_segment_ids": ones, "decoder_positions": positions,
            "decoder_loss_weights": ones.astype(np.float32)}
  return {"input_ids": seqs[:, :-1], "target_ids": seqs[:, 1:], "segment_ids": ones, "positions": positions,
          "loss_weights": ones.astype(np.float32)}


TRAINED = {
    "gemma": GemmaConfig(vocab_size=V, d_model=64, num_heads=2, num_kv_heads=1, head_dim=32, d_ff=128, num_layers=2,
                         layer_types=("sliding_attention", "full_attention"), sliding_window=8, pad_token_id=0,
                         eos_token_id=1, bos_token_id=2),
    "t5": T5Config(vocab_size=V, d_model=64, num_heads=2, head_dim=32, d_ff=128, num_encoder_layers=2,
                   num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                   mlp_activation="gelu_tanh", mlp_gated=True, tie_lm_head=False, scale_decoder_outputs=False),
}


def _train(config, steps: int = 300) -> tuple[dict, np.ndarray]:
  """Adam on chains of one fixed permutation until greedy decoding follows it; (params, perm)."""
  rng = np.random.default_rng(0)
  perm = rng.permutation(np.arange(3, V))[np.maximum(np.arange(V) - 3, 0)]  # perm[t] in [3, V) for every t
  params = init_params(family_of_config(config).param_specs(config), jax.random.key(0))
  opt = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state, batch):
    def loss(p):
      out = loss_sums(p, config, batch, None, label_smoothing=0.0, z_loss=0.0)
      return out["loss"] / out["weight_sum"]
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state = opt.init(params)
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state, _batch(config, _chains(rng, 32, 17, perm)))
  # Noise 0.15 over 61 tokens: the best possible loss is about 0.85 x -log(0.85) + 0.15 x -log(0.15 / 61) = 1.04.
  assert float(loss) < 1.3, f"the model did not learn the chains (loss {float(loss):.2f})"
  return params, perm


# Gemma: its tied embedding is quantized once and read both ways (gathered rows, and the head). T5 trained the same way
# (TRAINED["t5"], parametrize to run it) agreed at 100% with max |logit diff| 0.78% (int8) / 0.24% (bfloat16) of the
# largest logit; it is left out to keep this file's run time down, the twin test below covering T5's code paths.
@pytest.mark.parametrize("family", ["gemma"])
def test_trained_model_keeps_its_greedy_tokens_and_logits(family, tmp_path):
  config = TRAINED[family]
  params, perm = _train(config)
  Model(config, params).save(str(tmp_path / "ckpt"))
  f32 = t5x_lite.load(str(tmp_path / "ckpt"), progress=False)
  prompts = _chains(np.random.default_rng(1), 16, 6, perm, noise=0.0)
  if config.is_encoder_decoder:
    prompts = np.repeat(prompts[:, :1], 8, axis=1)
  want = f32.generate(prompts, max_new_tokens=12)
  follows = np.mean(want[:, 1:] == perm[want[:, :-1]])
  assert follows > 0.9, f"float32 greedy decoding follows the chain at only {follows:.0%} of steps"
  held_out = _batch(config, _chains(np.random.default_rng(2), 8, 17, perm))
  logit_args = ((held_out["input_ids"], None, held_out["decoder_input_ids"]) if config.is_encoder_decoder
                else (held_out["input_ids"],))
  ref = f32.logits(*logit_args)
  ref_score = f32.score(prompts, want)
  f32_bytes = quantize_lib.params_bytes(f32.params)
  for mode in ("int8", "bfloat16"):
    m = t5x_lite.load(str(tmp_path / "ckpt"), progress=False, quantize=mode)
    got = m.generate(prompts, max_new_tokens=12)
    agree = np.mean(got == want)
    assert agree >= 0.95, f"{mode}: greedy tokens equal float32's at {agree:.1%} of positions"
    diff = np.abs(m.logits(*logit_args) - ref).max()
    assert diff <= LOGIT_TOL[mode] * np.abs(ref).max(), (mode, diff, np.abs(ref).max())
    np.testing.assert_allclose(m.score(prompts, want), ref_score, rtol=LOGIT_TOL[mode], atol=LOGIT_TOL[mode])
    ratio = quantize_lib.params_bytes(m.params) / f32_bytes
    # Norms, relative-position tables and scales stay float32: a little over 1/4 and 1/2 on models this small.
    assert ratio < {"int8": 0.3, "bfloat16": 0.52}[mode], (mode, ratio)
    print(f"{family} {mode}: greedy agreement {agree:.1%}, max |logit diff| {diff:.4f} (max |logit| "
          f"{np.abs(ref).max():.2f}), params {ratio:.3f} of float32")


# ------------------------------------------------------------------------------------------ every family

def _float_twin(m: Model) -> Model:
  """A float32 model holding exactly the quantized model's weights (its int8 values times their scales)."""
  return Model(m.config, quantize_lib.dequantize_params(m.params, "float32"))


def _inputs(config):
  rng = np.random.default_rng(3)
  ids = rng.integers(3, 100, (2, 7)).astype(np.int32)
  dec = rng.integers(3, 100, (2, 5)).astype(np.int32)
  return ids, dec


@pytest.mark.parametrize("family", list(TINY))
def test_every_family_runs_quantized_as_its_rounded_float_twin(family, tmp_path):
  """The logits and greedy tokens of a quantized model equal those of a float32 model holding its rounded weights
  (quantization changes the weights and nothing else), in either dequantization mode of the decoding steps
  (nn/quant.py), whatever this backend's default; encode, score, beam search and sampling run on it. (bfloat16
  storage is a cast the read sites already made: test_trained_model_... and test_which_weights_... cover it.)"""
  config, _, params = _built(family, "lm")
  Model(config, params).save(str(tmp_path / "ckpt"))
  ids, dec = _inputs(config)
  kw = {"decoder_input_ids": dec} if config.is_encoder_decoder else {}
  m = t5x_lite.load(str(tmp_path / "ckpt"), progress=False, quantize="int8")
  kernel = m.params["embed"]["embedding"]
  assert quant.is_quantized(kernel) and kernel.qvalue.dtype == jnp.int8 and kernel.scale.shape[1] == 1
  twin = _float_twin(m)
  logits = m.logits(ids, **kw)
  np.testing.assert_allclose(logits, twin.logits(ids, **kw), atol=1e-5, rtol=1e-5)
  tokens = m.generate(ids, max_new_tokens=5)
  np.testing.assert_array_equal(tokens, twin.generate(ids, max_new_tokens=5))
  other = "step" if quant.dequantize_mode() == "call" else "call"
  try:
    quant.DEQUANTIZE = other
    generation.generate_fn.cache_clear()  # the mode is read when generate is traced
    np.testing.assert_array_equal(m.generate(ids, max_new_tokens=5), tokens, err_msg=f"dequantize {other}")
  finally:
    quant.DEQUANTIZE = "auto"
    generation.generate_fn.cache_clear()
  # score = the sum of the logits' log-probabilities of the targets (checked against the forward pass above)
  if config.is_encoder_decoder:
    start = np.full((2, 1), config.decoder_start_token_id, np.int32)
    full = m.logits(ids, decoder_input_ids=np.concatenate([start, dec[:, :-1]], axis=1))
    want = np.take_along_axis(jax.nn.log_softmax(full), dec[..., None], axis=-1)[..., 0].sum(axis=1)
    np.testing.assert_allclose(m.score(ids, dec), want, atol=1e-4, rtol=1e-5)
    assert m.encode(ids).shape == (2, ids.shape[1], config.d_model)
  else:
    full = m.logits(np.concatenate([ids, dec], axis=1))[:, ids.shape[1] - 1:-1]
    want = np.take_along_axis(jax.nn.log_softmax(full), dec[..., None], axis=-1)[..., 0].sum(axis=1)
    np.testing.assert_allclose(m.score(ids, dec), want, atol=1e-4, rtol=1e-5)
  beams = m.generate(ids, max_new_tokens=5, method="beam", num_beams=3)
  assert beams.shape == (2, 5) and np.isin(beams, np.arange(config.vocab_size)).all()
  assert m.generate(ids, max_new_tokens=5, method="sample", seed=1).shape == (2, 5)


@pytest.mark.parametrize("family", list(TINY))
def test_sharded_quantized_equals_unsharded(family, tmp_path):
  config, _, params = _built(family, "lm")
  Model(config, params).save(str(tmp_path / "ckpt"))
  ids, dec = _inputs(config)
  kw = {"decoder_input_ids": dec} if config.is_encoder_decoder else {}
  one = t5x_lite.load(str(tmp_path / "ckpt"), progress=False, quantize="int8")
  mesh = t5x_lite.make_mesh("data:2,fsdp:2,tensor:2")
  sharded = t5x_lite.load(str(tmp_path / "ckpt"), progress=False, quantize="int8", mesh=mesh)
  q = sharded.params["embed"]["embedding"].qvalue
  assert q.dtype == jnp.int8 and len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
  np.testing.assert_allclose(sharded.logits(ids, **kw), one.logits(ids, **kw), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(sharded.generate(ids, max_new_tokens=5), one.generate(ids, max_new_tokens=5))


def test_which_weights_are_quantized():
  """Matmul weights and the token embedding; norms, biases, relpos tables and classification heads stay."""
  config, _, params = _built("t5gemma2", "seq_cls")
  q = quantize_lib.quantize_params(params, config, "int8")
  assert quant.is_quantized(q["decoder"]["layers"]["attn"]["q"])  # (L, D, N, H): one scale per (L, N, H)
  assert q["decoder"]["layers"]["attn"]["q"].scale.shape == (2, 1, 4, 16)
  assert q["decoder"]["layers"]["mlp"]["wo"].scale.shape == (2, 1, 32)  # (L, F, D): one per (L, D)
  assert q["vision"]["layers"]["mlp"]["fc1"]["kernel"].scale.shape == (1, 1, 16)
  assert q["projector"]["kernel"].scale.shape == (1, 32)
  assert q["embed"]["embedding"].scale.shape == (300, 1)  # one per vocabulary row
  for kept in (q["decoder"]["layers"]["attn_norm"]["scale"], q["score"]["kernel"], q["score"]["bias"],
               q["vision"]["patch_embed"]["kernel"], q["vision"]["position_embedding"]["embedding"],
               q["vision"]["layers"]["mlp"]["fc1"]["bias"]):
    assert not quant.is_quantized(kept) and kept.dtype == jnp.float32
  t5 = quantize_lib.quantize_params(_built("t5", "lm")[2], TINY["t5"]["lm"], "bfloat16")
  assert t5["lm_head"]["kernel"].dtype == jnp.bfloat16 and t5["decoder"]["relpos"].dtype == jnp.float32


def test_bad_quantize_value_is_refused(tmp_path):
  with pytest.raises(ValueError, match="quantize must be None, 'int8' or 'bfloat16', got 'int4'"):
    t5x_lite.load(str(tmp_path), quantize="int4")


def test_saving_a_quantized_model_writes_its_rounded_weights(tmp_path):
  config, _, params = _built("gemma", "lm")
  Model(config, params).save(str(tmp_path / "ckpt"))
  m = t5x_lite.load(str(tmp_path / "ckpt"), progress=False, quantize="int8")
  m.save(str(tmp_path / "again"))
  back = t5x_lite.load(str(tmp_path / "again"), progress=False)
  ids, _ = _inputs(config)
  np.testing.assert_allclose(back.logits(ids), m.logits(ids), atol=1e-5, rtol=1e-5)


def test_infer_quantize_flag_is_recorded_and_a_change_refused(tmp_path):
  config, _, params = _built("gemma", "lm")
  Model(config, params).save(str(tmp_path / "ckpt"))
  (tmp_path / "in.jsonl").write_text('{"input_ids": [5, 6, 7]}\n{"input_ids": [9, 10]}\n')
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}

  def infer(*flags):
    return subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), "--model", str(tmp_path / "ckpt"),
                           "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                           "--max-new-tokens", "4", *flags], env=env, capture_output=True, text=True)

  r = infer("--quantize", "int8")
  assert r.returncode == 0, r.stderr
  out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  m = t5x_lite.load(str(tmp_path / "ckpt"), progress=False, quantize="int8")
  assert out[0]["output_ids"] == m.generate(np.array([[5, 6, 7]]), max_new_tokens=4)[0].tolist()
  record = json.loads((tmp_path / "out.jsonl.run").read_text().split("\n")[0])
  assert record["settings"]["--quantize"] == "int8"
  for flags, difference in [([], "--quantize: int8 -> none"), (["--quantize", "bfloat16"], "int8 -> bfloat16")]:
    r = infer(*flags)
    assert r.returncode == 2 and difference in r.stderr, (flags, r.stderr)
  r = infer("--quantize", "int4")
  assert r.returncode == 2 and "invalid choice: 'int4'" in r.stderr, r.stderr
