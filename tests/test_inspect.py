"""python -m t5x_lite.inspect: parameter count, FLOPs and per-device memory of a run from its gin files, on meshes of
64 and 128 devices that this machine does not have (an abstract mesh), equal to counts written out by hand."""

import json
import os
import subprocess
import sys

import pytest

from t5x_lite import inspect as inspect_cli
from t5x_lite.config import GemmaConfig, T5Config
from t5x_lite.models import gemma, t5
from t5x_lite.models.params import count_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30

# t5-v1_1-xxl (11 B parameters), pretrained at batch 256 x 512 on fsdp:64 with Adafactor and full remat.
XXL_RUN = """
train.model = @T5Config()
train.data = @DataConfig()
train.train_steps = 1
train.mesh_spec = "fsdp:64"
train.optimizer = "adafactor"
T5Config.vocab_size = 32128
T5Config.d_model = 4096
T5Config.num_heads = 64
T5Config.head_dim = 64
T5Config.d_ff = 10240
T5Config.num_encoder_layers = 24
T5Config.num_decoder_layers = 24
T5Config.mlp_activation = "gelu_tanh"
T5Config.mlp_gated = True
T5Config.tie_lm_head = False
T5Config.scale_decoder_outputs = False
T5Config.dtype = "bfloat16"
T5Config.remat = "full"
DataConfig.batch_size = 256
DataConfig.inputs_length = 512
DataConfig.targets_length = 512
"""


def _inspect(args, capsys) -> dict:
  assert inspect_cli.main(args) == 0, capsys.readouterr().err
  return json.loads(capsys.readouterr().out)


def test_t5_xxl_on_fsdp_64(tmp_path, capsys):
  (tmp_path / "xxl.gin").write_text(XXL_RUN)
  out = _inspect([str(tmp_path / "xxl.gin"), "--device_memory", "16GiB"], capsys)
  D, N, H, F, V, L, X = 4096, 64, 64, 10240, 32128, 24, 32
  config = T5Config(vocab_size=V, d_model=D, num_heads=N, head_dim=H, d_ff=F, num_encoder_layers=L,
                    num_decoder_layers=L, mlp_activation="gelu_tanh", mlp_gated=True, tie_lm_head=False,
                    scale_decoder_outputs=False)
  count = count_params(t5.param_specs(config))
  assert out["params"] == count == 11_135_332_352
  # Parameters (float32): everything but the norms and relpos tables has an `embed` axis split 64 ways over fsdp;
  # the (L, D) layer norms (encoder 2, decoder 3 per layer), the two final norms and the two (32, 64) relpos tables
  # are replicated.
  replicated = L * 5 * D + 2 * D + 2 * X * N
  params = (count - replicated) * 4 // 64 + replicated * 4
  # Adafactor: each kernel keeps row + column statistics (attention D + N*H: 4 per encoder layer, 8 per decoder
  # layer; MLP D + F: 3 per layer; embedding and head V + D), all split 64 ways (the axis a reduction freed goes to
  # the largest axis left: heads, F, V); the norms and relpos tables keep full second moments, replicated as
  # they are; one float of placeholder per unused slot (v and m of the 20 factored, v_row, v_col and m of the 9
  # others) and the step count.
  factored = L * (4 * (D + N * H) + 3 * (D + F)) + L * (8 * (D + N * H) + 3 * (D + F)) + 2 * (V + D)
  optimizer = (factored // 64 + replicated + 2 * 20 + 3 * 9 + 1) * 4
  # Activations (bfloat16), 256 / 64 = 4 rows per device, remat full: each layer keeps its input (512 x D); the
  # largest transient is a decoder layer's backward: its residuals recomputed (per row: input D, per attention
  # q + k + v + output projection + normed input + attention output = 6 x 4096 for N*H = D = 4096, MLP 2 F +
  # output + normed input + 2 F) and float32 logits + their gradient of one attention (2 x 4 x 64 x 512 x 512 x 4);
  # the head's float32 logits + gradient (2 x 4 x 512 x V x 4).
  rows, s = 4, 512
  saved = rows * 2 * L * s * D * 2
  decoder_layer = s * (D + 2 * 6 * D + (2 * F + D + D + 2 * F))
  transient = rows * decoder_layer * 2 + 2 * rows * N * s * s * 4
  logits = 2 * rows * s * V * 4
  activations = saved + transient + logits
  assert out["activations"] == {"saved": saved, "transient": transient, "logits": logits, "total": activations}
  want = {"params": params, "optimizer": optimizer, "gradients": params, "activations": activations,
          "total": 2 * params + optimizer + activations}
  assert out["per_device_bytes"] == want
  assert (params, optimizer) == (697_942_016, 2_296_512)  # 698 MB of weights, 2.3 MB of Adafactor state
  assert out["fits"] is (want["total"] <= 16 * GiB) is True
  # FLOPs: 2 x the weights an encoder token (encoder) and a decoder token (decoder, head) pass, averaged over the
  # row's 512 + 512 positions.
  encoder = count_params(t5.param_specs(config)["encoder"])
  decoder = count - encoder - V * D
  assert out["flops_per_token"] == {"forward": (2 * encoder * 512 + 2 * decoder * 512) / 1024,
                                    "train": 3 * (2 * encoder * 512 + 2 * decoder * 512) / 1024}
  assert out["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1} and out["batch"]["rows_per_device"] == 4


def test_gemma3_27b_on_fsdp_32_tensor_4(capsys):
  """The model file and bindings: batch 128 x 4096 in bfloat16 with remat dots, on 32 x 4 devices."""
  out = _inspect(["configs/models/gemma3_27b.gin", "--mesh", "fsdp:32,tensor:4", "--gin.DataConfig.batch_size=128",
                  "--gin.DataConfig.length=4096", "--gin.GemmaConfig.dtype='bfloat16'",
                  "--gin.GemmaConfig.remat='dots'", "--device_memory=80GiB"], capsys)
  D, N, K, H, F, V, L = 5376, 32, 16, 128, 21504, 262208, 62
  config = GemmaConfig(model_type="gemma3_text", vocab_size=V, d_model=D, d_ff=F, num_layers=L, num_heads=N,
                       num_kv_heads=K, head_dim=H, query_pre_attn_scalar=168, sliding_window=1024, sliding_pattern=6,
                       sandwich_norms=True, qk_norm=True)
  count = count_params(gemma.param_specs(config))
  assert out["params"] == count == 27_009_346_304
  # Parameters: every kernel and the (tied) embedding split 32 ways over fsdp (embed) and 4 over tensor (heads,
  # kv_heads, mlp, vocab); replicated: 4 (L, D) norms per layer (sandwich), the (L, H) q and k norms, the final norm.
  replicated = L * 4 * D + L * 2 * H + D
  params = (count - replicated) * 4 // 128 + replicated * 4
  # Adafactor statistics per device (float32 entries); a kernel is sharded fsdp on D and tensor on heads / F / V,
  # and the axis a statistic's reduction frees joins another of its axes that it divides:
  #   q, o: row stats (L, D) / 128 (tensor joins fsdp on D: 5376 = 128 x 42; L = 62 takes neither),
  #         column stats (L, N, H) / 128 (fsdp goes to H = 128)
  #   k, v: (L, D) / 128 and (L, K, H) / 128
  #   wi_0, wi_1, wo: (L, D) / 128 and (L, F) / 128 (fsdp joins tensor on F: 21504 = 128 x 168)
  #   embedding (V, D): (D,) / 128 and (V,) / 4 (262208 is not a multiple of 128)
  attention = L * (2 * (D // 128 + N * H // 128) + 2 * (D // 128 + K * H // 128))
  mlp = L * 3 * (D // 128 + F // 128)
  embedding = D // 128 + V // 4
  placeholders = 2 * 8 + 3 * 7 + 1  # 8 factored parameters (v, m), 7 norms (v_row, v_col, m), the step count
  optimizer = (attention + mlp + embedding + replicated + placeholders) * 4
  # Activations (bfloat16), 128 / 32 = 4 rows per device, 4096 positions, remat dots: per layer and row the input,
  # q (N/4 x H), k and v (K/4 x H each), the attention's output projection, the MLP's two input projections (F/4)
  # and its output; the transient: a layer's full residuals recomputed (+ normed inputs, the attention output
  # before its projection, the MLP's activation and its derivative) and float32 logits + gradient of its attention
  # (2 x 4 x 8 x 4096 x 4096 x 4); the tied head's float32 logits + gradient (2 x 4 x 4096 x V/4 x 4).
  rows, s = 4, 4096
  q, kv, f = N // 4 * H, K // 4 * H, F // 4
  dots = s * (D + (q + 2 * kv + D) + 2 * f + D)
  none = dots + s * (D + q) + s * D + 2 * s * f
  saved = rows * L * dots * 2
  transient = 2 * rows * (N // 4) * s * s * 4 + rows * none * 2
  logits = 2 * rows * s * (V // 4) * 4
  assert out["activations"] == {"saved": saved, "transient": transient, "logits": logits,
                                "total": saved + transient + logits}
  want = {"params": params, "optimizer": optimizer, "gradients": params, "activations": saved + transient + logits}
  want["total"] = sum(want.values())
  assert out["per_device_bytes"] == want
  assert out["fits"] is (want["total"] <= 80 * GiB)
  forward = 2 * (count - 0)  # the head is the tied embedding: every parameter is a weight a token passes
  assert out["flops_per_token"] == {"forward": forward, "train": 3 * forward}


def test_mistakes_exit_2_with_one_line(tmp_path, capsys):
  cases = [
      (["missing.gin"], "gin file 'missing.gin' not found"),
      (["configs/models/gemma3_27b.gin", "--gin.GemmaConfig.d_modle=3"], "doesn't have a parameter named 'd_modle'"),
      (["configs/models/gemma3_27b.gin", "--gin.BATCH_SIZE=3"], "no gin file defines the macro BATCH_SIZE"),
      (["configs/models/gemma3_27b.gin", "--mesh", "fsdp:x"], "bad mesh spec 'fsdp:x'"),
      (["configs/models/gemma3_27b.gin", "--device_memory", "16XB"], "--device_memory '16XB'"),
  ]
  for args, message in cases:
    assert inspect_cli.main(args) == 2, args
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, (args, err)
  (tmp_path / "empty.gin").write_text("DataConfig.batch_size = 8\n")
  assert inspect_cli.main([str(tmp_path / "empty.gin")]) == 2
  assert "name the model, e.g. --gin.train.model=@T5Config()" in capsys.readouterr().err


@pytest.mark.parametrize("text,size", [("16GiB", 16 * GiB), ("80GB", 80 * 10 ** 9), ("1024", 1024),
                                       ("1.5 MiB", 3 * 2 ** 19)])
def test_device_memory_sizes(text, size):
  assert inspect_cli.parse_bytes(text) == size


def test_command_line(tmp_path):
  """The module runs as `python -m t5x_lite.inspect` from any directory, the includes of a gin file resolved."""
  (tmp_path / "run.gin").write_text("include 'configs/models/t5_1_1_small.gin'\nDataConfig.batch_size = 8\n")
  r = subprocess.run([sys.executable, "-m", "t5x_lite.inspect", "run.gin", "--mesh", "data:2"], cwd=tmp_path,
                     env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert out["params"] == 76_961_152 and out["fits"] is None  # t5-v1_1-small
  assert out["per_device_bytes"]["params"] == 4 * 76_961_152 and out["batch"]["rows_per_device"] == 4
  assert out["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}


def test_a_frozen_stack_keeps_nothing_for_the_backward_pass():
  """train.frozen = ["vision"]: the tower's layers keep no residuals; its forward working set (one attention's
  float32 logits and its output, for all its rows) is the transient if it is the largest."""
  from t5x_lite.models.layers import Attention, Stack  # pylint: disable=import-outside-toplevel
  from t5x_lite.training.memory import activation_bytes, layer_residuals  # pylint: disable=import-outside-toplevel
  text = Stack(2, 8, 16, (Attention(8, 2, 2, 8),), 32, 2, path="encoder/layers")
  vision = Stack(3, 64, 16, (Attention(64, 2, 2, 8),), 32, 1, rows=4, path="vision/layers")
  args = dict(rows=2, remat="none", dtype_bytes=2, tensor=1, logits_positions=8, vocab=100)
  trained = activation_bytes((text, vision), **args)
  frozen = activation_bytes((text, vision), **args, frozen=("vision",))
  text_saved = 2 * 2 * (layer_residuals(text, "none", 1) * 2 + 8 * 2 * 4)
  assert frozen["saved"] == text_saved < trained["saved"]
  assert frozen["transient"] == 2 * 4 * (2 * 64 * 64 * 4 + 64 * 16 * 2)
  assert frozen["logits"] == trained["logits"] == 2 * 2 * 8 * 100 * 4
