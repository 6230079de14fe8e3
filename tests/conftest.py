"""Shared test setup: 8 host CPU devices for sharding tests, and tiny transformers models built on the spot."""

import os

# Before jax is imported anywhere: 8 CPU devices so sharded runs can be compared with unsharded ones, and the
# collective timeout of our entry points (t5x_lite/xla_flags.py: XLA:CPU aborts a process whose host devices wait
# for each other at a collective for 20 + 40 s of wall time, as 8 devices on a loaded 2-core machine did in issue 14).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
from t5x_lite import xla_flags  # noqa: E402  (imports no JAX)

xla_flags.set_cpu_defaults(xla_flags.COLLECTIVE_TIMEOUTS)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
torch.set_num_threads(2)
torch.set_flush_denormal(True)

# The tiny T5 shapes of ../shared/reference/tiny_configs (unequal encoder/decoder depth on purpose).
T5_TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def build_hf(model_cls, config, out_dir, seed=0):
  """A randomly initialised transformers model saved with save_pretrained (weights perturbed away from init
  patterns such as all-ones norms, so that a swapped or skipped tensor shows in the logits)."""
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.save_pretrained(out_dir)
  return model


def assert_close_to_hf(ours, ref, rtol=1e-4):
  """max |ours - HF| <= rtol * max(1, max |HF|), the project's float32 parity bar."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  scale = max(1.0, float(np.abs(ref).max()))
  err = float(np.abs(ours - ref).max())
  assert err <= rtol * scale, f"max abs diff {err:.3e} > {rtol} x {scale:.3f}"
  return err


def untie_lm_head(model_cls, out_dir, seed=1):
  """Rewrites a saved checkpoint the way T5v1.1 / Flan-T5 ship: a separate `lm_head.weight` that differs
  from `shared.weight`. Returns the transformers model reloaded from it (transformers unties on load)."""
  from safetensors.numpy import load_file, save_file
  path = os.path.join(out_dir, "model.safetensors")
  tensors = load_file(path)
  rng = np.random.default_rng(seed)
  tensors["lm_head.weight"] = rng.normal(0, 1, tensors["shared.weight"].shape).astype(np.float32)
  save_file(tensors, path, metadata={"format": "pt"})
  return model_cls.from_pretrained(out_dir).eval()


@pytest.fixture
def batch():
  """Encoder ids (2, 10) with the second row padded after 7 tokens, decoder ids (2, 7)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 128, (2, 10))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  ids[1, 7:] = 0
  dec = rng.integers(3, 128, (2, 7))
  return ids, mask, dec
