"""HF <-> ours conversion: round trips through transformers, sharded indexes, our orbax format, the CLI,
and the ConversionError raised for each kind of bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from conftest import T5_TINY, assert_close_to_hf, build_hf, untie_lm_head
from safetensors.numpy import load_file, save_file

import t5x_lite
from t5x_lite import ConversionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf_logits(model, ids, mask, dec):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 decoder_input_ids=torch.tensor(dec)).logits.numpy()


@pytest.fixture
def v11_dir(tmp_path):
  """A T5v1.1-style checkpoint: gated-gelu and an untied lm_head."""
  d = tmp_path / "hf"
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY, feed_forward_proj="gated-gelu",
                                                       tie_word_embeddings=False), d)
  untie_lm_head(tf.T5ForConditionalGeneration, d)
  return d


@pytest.mark.parametrize("untied", [False, True])
def test_round_trip_through_transformers(tmp_path, batch, untied):
  d = tmp_path / "hf"
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY), d)
  hf = untie_lm_head(tf.T5ForConditionalGeneration, d) if untied else \
      tf.T5ForConditionalGeneration.from_pretrained(d).eval()
  ids, mask, dec = batch
  ref = _hf_logits(hf, ids, mask, dec)
  model = t5x_lite.load(str(d), progress=False)
  model.save_hf(str(tmp_path / "export"))
  back = tf.T5ForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
  np.testing.assert_array_equal(_hf_logits(back, ids, mask, dec), ref)
  # Same tensors, bit for bit.
  a, b = load_file(d / "model.safetensors"), load_file(tmp_path / "export" / "model.safetensors")
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("cls,kwargs", [
    (tf.T5EncoderModel, {}), (tf.T5ForSequenceClassification, {"num_labels": 3}),
    (tf.T5ForTokenClassification, {"num_labels": 4}), (tf.T5ForQuestionAnswering, {}),
    (tf.UMT5ForConditionalGeneration, {}), (tf.MT5ForConditionalGeneration, {}),
])
def test_heads_round_trip(tmp_path, batch, cls, kwargs):
  config_cls = {"UMT5": tf.UMT5Config, "MT5F": tf.MT5Config}.get(cls.__name__[:4], tf.T5Config)
  hf = build_hf(cls, config_cls(**T5_TINY, **kwargs), tmp_path / "hf")
  ids, mask, _ = batch
  ids[:, -1] = 1  # an EOS per row for sequence classification
  mask[:, -1] = 1
  model = t5x_lite.load(str(tmp_path / "hf"), progress=False)
  model.save_hf(str(tmp_path / "export"))
  back = cls.from_pretrained(tmp_path / "export").eval()
  args = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  if cls in (tf.UMT5ForConditionalGeneration, tf.MT5ForConditionalGeneration):
    args["decoder_input_ids"] = torch.tensor(ids[:, :4])
  with torch.no_grad():
    out_a, out_b = hf(**args), back(**args)
  for key in out_a:
    if isinstance(out_a[key], torch.Tensor):
      np.testing.assert_array_equal(out_a[key].numpy(), out_b[key].numpy(), err_msg=key)


def test_sharded_index_checkpoint_loads(v11_dir, tmp_path, batch):
  hf = tf.T5ForConditionalGeneration.from_pretrained(v11_dir).eval()
  sharded = tmp_path / "sharded"
  hf.save_pretrained(sharded, max_shard_size="20KB")
  assert (sharded / "model.safetensors.index.json").exists()
  assert len(list(sharded.glob("model-*.safetensors"))) > 2
  ids, mask, dec = batch
  model = t5x_lite.load(str(sharded), progress=False)
  assert_close_to_hf(model.logits(ids, mask, dec), _hf_logits(hf, ids, mask, dec))
  # Our export shards too when asked, and transformers reads that index.
  model.save_hf(str(tmp_path / "ours_sharded"), max_shard_bytes=20_000)
  assert (tmp_path / "ours_sharded" / "model.safetensors.index.json").exists()
  back = tf.T5ForConditionalGeneration.from_pretrained(tmp_path / "ours_sharded").eval()
  np.testing.assert_array_equal(_hf_logits(back, ids, mask, dec), _hf_logits(hf, ids, mask, dec))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "t5x_lite.convert", *args], capture_output=True, text=True,
                        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})


def test_cli_round_trip_and_orbax_format(v11_dir, tmp_path, batch):
  ids, mask, dec = batch
  ref = _hf_logits(tf.T5ForConditionalGeneration.from_pretrained(v11_dir).eval(), ids, mask, dec)
  ckpt = tmp_path / "ckpt"
  r = _cli("--from-hf", str(v11_dir), "--out", str(ckpt))
  assert r.returncode == 0, r.stderr
  assert "converting" in r.stderr  # the progress bar
  assert (ckpt / "params").is_dir()
  model = t5x_lite.load(str(ckpt))
  assert_close_to_hf(model.logits(ids, mask, dec), ref)
  r = _cli("--to-hf", str(ckpt), "--out", str(tmp_path / "back"))
  assert r.returncode == 0, r.stderr
  back = tf.T5ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
  np.testing.assert_array_equal(_hf_logits(back, ids, mask, dec), ref)
  # bfloat16 storage
  r = _cli("--from-hf", str(v11_dir), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16")
  assert r.returncode == 0, r.stderr
  m16 = t5x_lite.load(str(tmp_path / "bf16"), dtype="bfloat16")
  assert str(m16.params["embed"]["embedding"].dtype) == "bfloat16"
  assert_close_to_hf(m16.logits(ids, mask, dec), ref, rtol=3e-2)
  # Refuses to overwrite, and says so without a traceback.
  r = _cli("--from-hf", str(v11_dir), "--out", str(ckpt))
  assert r.returncode == 2 and "already holds a checkpoint" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------ bad inputs

def _rewrite(path, fn):
  tensors = load_file(path)
  fn(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_unknown_model_type(v11_dir):
  cfg = json.loads((v11_dir / "config.json").read_text())
  cfg["model_type"] = "bart"
  (v11_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConversionError, match=r"config.json: model_type 'bart' is not supported"):
    t5x_lite.load(str(v11_dir), progress=False)


def test_unsupported_architecture(v11_dir):
  cfg = json.loads((v11_dir / "config.json").read_text())
  cfg["architectures"] = ["T5WithLMHeadAndSomething"]
  (v11_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConversionError, match="architecture 'T5WithLMHeadAndSomething' is not supported"):
    t5x_lite.load(str(v11_dir), progress=False)


def test_invalid_config_json(v11_dir):
  (v11_dir / "config.json").write_text('{"model_type": "t5",\n "d_model": 32,,}')
  with pytest.raises(ConversionError, match=r"config.json: invalid JSON at line 2"):
    t5x_lite.load(str(v11_dir), progress=False)


def test_missing_tensor(v11_dir):
  _rewrite(v11_dir / "model.safetensors", lambda t: t.pop("decoder.block.2.layer.2.DenseReluDense.wo.weight"))
  with pytest.raises(ConversionError, match=r"tensor 'decoder.block.2.layer.2.DenseReluDense.wo.weight' is "
                                            r"missing \(expected shape \(32, 64\)\)"):
    t5x_lite.load(str(v11_dir), progress=False)


def test_unexpected_tensor(v11_dir):
  _rewrite(v11_dir / "model.safetensors", lambda t: t.update(extra_head=np.zeros((3, 3), np.float32)))
  with pytest.raises(ConversionError, match=r"model.safetensors: unexpected tensor 'extra_head' with shape \(3, 3\)"):
    t5x_lite.load(str(v11_dir), progress=False)


def test_misshaped_tensor(v11_dir):
  _rewrite(v11_dir / "model.safetensors",
           lambda t: t.update({"encoder.block.1.layer.0.SelfAttention.k.weight": np.zeros((16, 32), np.float32)}))
  with pytest.raises(ConversionError, match=r"model.safetensors: tensor 'encoder.block.1.layer.0.SelfAttention.k"
                                            r".weight' has shape \(16, 32\), expected \(32, 32\)"):
    t5x_lite.load(str(v11_dir), progress=False)


def test_truncated_file(v11_dir):
  path = v11_dir / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(ConversionError, match=r"model.safetensors: .*truncated or corrupt"):
    t5x_lite.load(str(v11_dir), progress=False)


def test_corrupt_header(v11_dir):
  path = v11_dir / "model.safetensors"
  data = bytearray(path.read_bytes())
  data[8:20] = b"not json!!!!"
  path.write_bytes(bytes(data))
  with pytest.raises(ConversionError, match=r"model.safetensors: .*truncated or corrupt"):
    t5x_lite.load(str(v11_dir), progress=False)


def test_missing_shard(v11_dir, tmp_path):
  sharded = tmp_path / "sharded"
  tf.T5ForConditionalGeneration.from_pretrained(v11_dir).save_pretrained(sharded, max_shard_size="20KB")
  victim = sorted(sharded.glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(ConversionError, match=f"lists shard '{victim.name}', which is missing"):
    t5x_lite.load(str(sharded), progress=False)


def test_no_weights(v11_dir):
  (v11_dir / "model.safetensors").unlink()
  with pytest.raises(ConversionError, match="no model.safetensors or model.safetensors.index.json"):
    t5x_lite.load(str(v11_dir), progress=False)


def test_cli_reports_errors_cleanly(v11_dir, tmp_path):
  _rewrite(v11_dir / "model.safetensors", lambda t: t.pop("shared.weight"))
  r = _cli("--from-hf", str(v11_dir), "--out", str(tmp_path / "out"))
  assert r.returncode == 2
  assert "error:" in r.stderr and "'shared.weight' is missing" in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "out").exists()  # nothing half-written


def _embedding_copies(path, shared, names, nudge=None):
  """Rewrites `names` as copies of `shared`, then adds 0.5 to one entry of tensor `nudge` if given."""
  def fn(tensors):
    tensors.update({n: tensors[shared].copy() for n in names})
    if nudge:
      tensors[nudge][5, 0] += 0.5
  _rewrite(path, fn)


@pytest.mark.parametrize("cls,prefix", [(tf.T5ForConditionalGeneration, ""),
                                        (tf.T5ForSequenceClassification, "transformer.")])
def test_embedding_copies_load_only_when_equal_to_shared(tmp_path, batch, cls, prefix):
  """Old exports store each stack's embed_tokens as a copy of shared.weight: loaded silently. A differing one
  (untied input embeddings) is what transformers feeds that stack, so loading shared.weight in its place would
  change the logits: refused, naming the tensor."""
  d = tmp_path / "hf"
  build_hf(cls, tf.T5Config(**T5_TINY, num_labels=3), d)
  shared = f"{prefix}shared.weight"
  names = [f"{prefix}encoder.embed_tokens.weight", f"{prefix}decoder.embed_tokens.weight"]
  _embedding_copies(d / "model.safetensors", shared, names)
  ids, mask, _ = batch
  ids[:, -1] = mask[:, -1] = 1  # an EOS per row for sequence classification
  dec = ids[:, :4] if prefix == "" else None
  with torch.no_grad():
    ref = cls.from_pretrained(d).eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                         decoder_input_ids=None if dec is None else torch.tensor(dec)).logits.numpy()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert_close_to_hf(t5x_lite.load(str(d), progress=False).logits(ids, mask, dec), ref)
  for victim in names:
    _embedding_copies(d / "model.safetensors", shared, names, nudge=victim)
    hf = cls.from_pretrained(d)
    assert not torch.equal(hf.get_parameter(victim), hf.get_parameter(shared))  # transformers keeps it apart
    with pytest.raises(ConversionError, match=rf"model.safetensors: tensor '{re.escape(victim)}' differs from "
                                              rf"'{re.escape(shared)}' \(max abs diff 0.5\)"):
      t5x_lite.load(str(d), progress=False)
  _rewrite(d / "model.safetensors", lambda t: t.update({names[0]: t[shared][:-1].copy()}))
  with pytest.raises(ConversionError, match=rf"'{re.escape(names[0])}' has shape \(127, 32\), expected \(128, 32\)"):
    t5x_lite.load(str(d), progress=False)


def test_failed_export_leaves_no_partial_output(v11_dir, tmp_path, monkeypatch):
  model = t5x_lite.load(str(v11_dir), progress=False)
  from t5x_lite.convert import hf as hf_mod

  real = hf_mod.hf_tensors

  def broken(*a, **k):
    tensors = real(*a, **k)
    yield next(tensors)
    yield next(tensors)
    raise OSError("disk full")

  monkeypatch.setattr(hf_mod, "hf_tensors", broken)
  with pytest.raises(OSError, match="disk full"):
    model.save_hf(str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
  shutil.rmtree(v11_dir)


# ------------------------------------------------------------------------------------ interrupted runs

# The convert CLI with a pause at a fixed point of its writing (no sleeps): it prints PAUSED and waits on stdin.
_PAUSING_CLI = """
import sys
from t5x_lite.convert import __main__ as cli, checkpoint, hf

def pause():
  print("PAUSED", flush=True)
  sys.stdin.readline()

real_tensors, real_config_to_json = hf.hf_tensors, checkpoint.config_to_json

def tensors(*args, **kwargs):  # --to-hf: two tensors are in the temporary folder
  for n, tensor in enumerate(real_tensors(*args, **kwargs)):
    if n == 2:
      pause()
    yield tensor

def config_to_json(config):  # --from-hf: orbax has written the params, config.json is next
  pause()
  return real_config_to_json(config)

hf.hf_tensors, checkpoint.config_to_json = tensors, config_to_json
sys.exit(cli.main(sys.argv[1:]))
"""


def _paused_cli(tmp_path, *args):
  script = tmp_path / "pausing_cli.py"
  script.write_text(_PAUSING_CLI)
  p = subprocess.Popen([sys.executable, str(script), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
  line = p.stdout.readline()
  assert line == "PAUSED\n", (line, p.communicate()[1] if not line else "")
  return p


def _temp_dirs(path):
  return sorted(e for e in os.listdir(path) if e.startswith(".tmp-"))


@pytest.mark.parametrize("direction,signum", [("--to-hf", signal.SIGTERM), ("--from-hf", signal.SIGTERM),
                                              ("--from-hf", signal.SIGINT)])
def test_cli_interrupted_removes_its_temporary_output(v11_dir, tmp_path, direction, signum):
  """SIGTERM (or Ctrl-C) mid-write: the temporary folder goes, one error line, exit 128 + signal number."""
  out = tmp_path / "out"
  p = _paused_cli(tmp_path, direction, str(v11_dir), "--out", str(out))
  assert len(_temp_dirs(tmp_path)) == 1  # paused mid-write
  p.send_signal(signum)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 128 + signum, err
  assert err.splitlines()[-1] == (f"error: interrupted by {signal.Signals(signum).name}; {out} was not written "
                                  "(its temporary files are removed)")
  assert "Traceback" not in err
  assert sorted(os.listdir(tmp_path)) == ["hf", "pausing_cli.py"]


def test_cli_removes_the_temporary_output_of_a_killed_run(v11_dir, tmp_path):
  """SIGKILL leaves the folder; the next write beside it removes it: its name carries the pid, now gone."""
  from t5x_lite.convert import staging
  out = tmp_path / "out"
  p = _paused_cli(tmp_path, "--to-hf", str(v11_dir), "--out", str(out))
  p.kill()
  p.communicate()
  stale = _temp_dirs(tmp_path)
  assert len(stale) == 1 and f"-pid{p.pid}@" in stale[0]
  # Not provably dead writers of ours: a live process, another host, another program's hidden folder.
  keep = [f".tmp-out-pid{os.getpid()}@{staging._host()}-0123abcd", f".tmp-out-pid{p.pid}@elsewhere-0123abcd",
          ".tmp-out-0123abcd"]
  for name in keep:
    (tmp_path / name).mkdir()
  r = _cli("--to-hf", str(v11_dir), "--out", str(out))
  assert r.returncode == 0, r.stderr
  assert f"removed {tmp_path / stale[0]}: the temporary output of process {p.pid}, which no longer runs" in r.stderr
  assert sorted(os.listdir(tmp_path)) == sorted(["hf", "out", "pausing_cli.py", *keep])
  assert _raw_tensors(out / "model.safetensors") == _raw_tensors(v11_dir / "model.safetensors")


# ------------------------------------------------------------------------------------ dtypes and output dirs

def _raw_tensors(path):
  """name -> (safetensors dtype code, raw bytes) straight from the file, for bit-exact comparisons."""
  data = path.read_bytes()
  n = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + n])
  header.pop("__metadata__", None)
  return {k: (v["dtype"], data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]) for k, v in header.items()}


def _bits(x):
  """A bfloat16 tensor (torch, or numpy with ml_dtypes) as int16 bit patterns, so equal means bit-identical."""
  return x.view(torch.int16).numpy() if isinstance(x, torch.Tensor) else np.asarray(x).view(np.int16)


def test_bfloat16_export_loads_in_transformers(v11_dir, tmp_path, batch):
  from t5x_lite.convert.hf import hf_tensor_entries, hf_tensors
  ids, mask, dec = batch
  ref = tf.T5ForConditionalGeneration.from_pretrained(v11_dir, dtype=torch.bfloat16).eval()
  m16 = t5x_lite.load(str(v11_dir), dtype="bfloat16", progress=False)
  ours = {e[0]: t for e, t in zip(hf_tensor_entries(m16.params, m16.config), hf_tensors(m16.params, m16.config))}
  m16.save_hf(str(tmp_path / "bf16_model"))
  t5x_lite.load(str(v11_dir), progress=False).save_hf(str(tmp_path / "f32_model"), dtype="bfloat16")
  r = _cli("--to-hf", str(v11_dir), "--out", str(tmp_path / "cli"), "--dtype", "bfloat16")
  assert r.returncode == 0, r.stderr
  for out in ("bf16_model", "f32_model", "cli"):
    assert {d for d, _ in _raw_tensors(tmp_path / out / "model.safetensors").values()} == {"BF16"}, out
    back = tf.T5ForConditionalGeneration.from_pretrained(tmp_path / out, dtype=torch.bfloat16).eval()
    state = back.state_dict()
    for name, tensor in ours.items():
      np.testing.assert_array_equal(_bits(state[name]), _bits(tensor), err_msg=f"{out}: {name}")
    # The same weights as transformers' own bfloat16 cast of the source, hence the same logits exactly.
    with torch.no_grad():
      args = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec))
      assert torch.equal(back(**args).logits, ref(**args).logits), out


def test_cli_keeps_the_source_dtype(tmp_path):
  """A bfloat16 HF checkpoint -> ours -> HF without --dtype stays bfloat16, bit for bit."""
  hf = build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY), tmp_path / "f32")
  hf.to(torch.bfloat16).save_pretrained(tmp_path / "src")
  r = _cli("--from-hf", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt"))
  assert r.returncode == 0, r.stderr
  assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["config"]["param_dtype"] == "bfloat16"
  r = _cli("--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"))
  assert r.returncode == 0, r.stderr
  src = _raw_tensors(tmp_path / "src" / "model.safetensors")
  back = _raw_tensors(tmp_path / "back" / "model.safetensors")
  assert {d for d, _ in src.values()} == {"BF16"}
  assert src == back


def test_integer_tensor(v11_dir):
  _rewrite(v11_dir / "model.safetensors", lambda t: t.update({"shared.weight": t["shared.weight"].astype(np.int32)}))
  with pytest.raises(ConversionError, match=r"model.safetensors: tensor 'shared.weight' has dtype int32, expected a "
                                            r"floating dtype"):
    t5x_lite.load(str(v11_dir), progress=False)


def test_unwritable_output_names_the_given_path(v11_dir, tmp_path):
  model = t5x_lite.load(str(v11_dir), progress=False)
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  out = str(blocker / "out")  # its parent is a file: it cannot be created
  for save in (model.save_hf, model.save):
    with pytest.raises(ConversionError, match=f"^{out}: cannot create the output directory"):
      save(out)
  with pytest.raises(ConversionError, match=f"^{blocker}: exists and is not a directory"):
    model.save_hf(str(blocker))
  assert sorted(os.listdir(tmp_path)) == ["a_file", "hf"]  # no temporary directory left behind
  r = _cli("--from-hf", str(v11_dir), "--out", out)
  assert r.returncode == 2 and f"error: {out}: cannot create" in r.stderr and "Traceback" not in r.stderr


def test_cli_to_hf_refuses_a_used_out_and_bad_shard_sizes(v11_dir, tmp_path):
  before = (v11_dir / "model.safetensors").read_bytes()
  r = _cli("--to-hf", str(v11_dir), "--out", str(v11_dir), "--dtype", "bfloat16")
  assert r.returncode == 2 and "already holds a checkpoint" in r.stderr and "Traceback" not in r.stderr
  assert (v11_dir / "model.safetensors").read_bytes() == before
  for size in ("0", "-5"):
    r = _cli("--to-hf", str(v11_dir), "--out", str(tmp_path / "out"), "--max-shard-size-mb", size)
    assert r.returncode == 2 and "--max-shard-size-mb must be positive" in r.stderr, r.stderr
  assert not (tmp_path / "out").exists()
  with pytest.raises(ValueError, match="max_shard_bytes must be positive"):
    t5x_lite.load(str(v11_dir), progress=False).save_hf(str(tmp_path / "out"), max_shard_bytes=0)


def test_export_directory_permissions_follow_the_umask(v11_dir, tmp_path):
  model = t5x_lite.load(str(v11_dir), progress=False)
  old = os.umask(0o027)
  try:
    model.save_hf(str(tmp_path / "out"))
  finally:
    os.umask(old)
  assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o750
  assert os.stat(tmp_path / "out" / "model.safetensors").st_mode & 0o777 == 0o640


def test_export_refuses_a_model_transformers_cannot_hold(tmp_path):
  """A config transformers' config.json cannot express is refused by name instead of exporting another model."""
  from t5x_lite.config import GemmaConfig  # pylint: disable=import-outside-toplevel
  from t5x_lite.model import Model  # pylint: disable=import-outside-toplevel
  from t5x_lite.models.params import init_params  # pylint: disable=import-outside-toplevel
  from t5x_lite.models.registry import family_of_config  # pylint: disable=import-outside-toplevel
  base = GemmaConfig(vocab_size=64, d_model=16, num_heads=2, num_kv_heads=1, head_dim=8, d_ff=32, num_layers=2,
                     model_type="gemma2", qk_norm=False, rope_theta=10_000.0, rope_local_theta=10_000.0)
  for config, message in [
      (base.replace(rope_local_theta=500.0),
       r"transformers' gemma2 config cannot hold this model \(rope_local_theta: 500.0 would load as 10000.0\)"),
      (base.replace(model_type="gemma3_text", qk_norm=True, task="token_cls"),
       r"transformers has no gemma3_text model for task 'token_cls' \(it has \['lm', 'seq_cls'\]\)")]:
    params = init_params(family_of_config(config).param_specs(config), jax.random.key(0))
    with pytest.raises(t5x_lite.ConversionError, match=message):
      Model(config, params).save_hf(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
