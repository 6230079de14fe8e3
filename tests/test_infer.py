"""infer.py end to end: JSONL in, JSONL out in order, per-line errors, kill -9 and resume without duplicates;
run-wide mistakes (settings, an output that is the input, unwritable, not ours or another run's) refused with exit 2
before anything loads."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm
import transformers as tf
from conftest import T5_TINY, build_hf

import t5x_lite
from t5x_lite import inference_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CACHE = {}
WORDS = "the quick brown fox jumps over a lazy dog hello world translate summarize question answer".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny T5 (vocab 140 = 40 pieces + 100 sentinels) with a sentencepiece model trained here."""
  d = tmp_path_factory.mktemp("t5_with_tokenizer")
  _CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
  (d / "spiece.model").write_bytes(_train_spm(0, 40))
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**{**T5_TINY, "vocab_size": 140}), d, seed=5)
  return str(d)


def _train_spm(corpus_seed: int, vocab_size: int) -> bytes:
  rng = np.random.default_rng(corpus_seed)
  corpus = [" ".join(rng.choice(WORDS, rng.integers(3, 10))) for _ in range(500)]
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size, pad_id=0,
                                 eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  return buf.getvalue()


@pytest.fixture(scope="module")
def big_tokenizer_dir(tmp_path_factory):
  """A T5 tokenizer of 44 pieces + 100 sentinels: ids up to 143, past model_dir's vocabulary of 140."""
  d = tmp_path_factory.mktemp("big_tokenizer")
  (d / "spiece.model").write_bytes(_train_spm(0, 44))
  return str(d)


def _infer(*args, **popen):
  cmd = [sys.executable, os.path.join(REPO, "infer.py"), *args]
  # A shared persistent compilation cache: the repeated runs of the resume test skip recompiling.
  # (Set up by the model_dir fixture; a test without a model, run on its own, goes without.)
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  if "dir" in _CACHE:
    env.update({"JAX_COMPILATION_CACHE_DIR": _CACHE["dir"], "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  if popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, env=env, capture_output=True, text=True)


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_good_and_bad_lines_answered_in_order(model_dir, tmp_path):
  lines = ['{"text": "hello world"}', "not json", '{"input_ids": [5, 6, 7, 1]}', '{"nope": 1}',
           '{"text": ""}', '{"input_ids": [5, 99999]}', '{"text": "the lazy dog jumps"}',
           '{"text": "' + " ".join(["fox"] * 300) + '"}', '[1, 2]', '{"input_ids": "abc"}']
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  r = _infer("--model", model_dir, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
             "--batch-size", "3", "--max-new-tokens", "6", "--max-input-length", "200", "--mesh", "data:2")
  assert r.returncode == 0, r.stderr
  out = _read(tmp_path / "out.jsonl")
  assert len(out) == len(lines)
  errors = {i: o.get("error", "") for i, o in enumerate(out)}
  assert "invalid JSON" in errors[1]
  assert 'give "text" or "input_ids"' in errors[3]
  assert "empty input" in errors[4]
  assert "99999" in errors[5] and "outside the vocabulary" in errors[5]
  assert "over --max-input-length 200" in errors[7]
  assert "JSON object" in errors[8]
  assert "list of integer ids" in errors[9]
  model = t5x_lite.load(model_dir, progress=False)
  for i, text in ((0, "hello world"), (6, "the lazy dog jumps")):
    ids = model.tokenizer.encode(text)
    want = model.generate(np.array([ids]), max_new_tokens=6)[0]
    eos = np.flatnonzero(want == model.config.eos_token_id)
    want = want[:eos[0] + 1] if eos.size else want
    assert out[i]["output_ids"] == want.tolist()
    assert out[i]["output"] == model.tokenizer.decode(want.tolist())
  assert out[2]["output_ids"] == model.generate(np.array([[5, 6, 7, 1]]), max_new_tokens=6)[0][
      :len(out[2]["output_ids"])].tolist()


def test_score_mode(model_dir, tmp_path):
  lines = ['{"text": "hello world", "target": "the dog"}', '{"text": "hello"}',
           '{"input_ids": [5, 6, 1], "target": [7, 8, 1]}', '{"input_ids": [5], "target": 7}',
           '{"input_ids": [5], "target": [7, 8.0]}']
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  r = _infer("--model", model_dir, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
             "--mode", "score")
  assert r.returncode == 0, r.stderr
  out = _read(tmp_path / "out.jsonl")
  model = t5x_lite.load(model_dir, progress=False)
  want = model.score(np.array([model.tokenizer.encode("hello world")]), np.array([model.tokenizer.encode("the dog")]))
  assert out[0]["score"] == pytest.approx(float(want[0]), rel=1e-5)
  assert 'missing field "target"' in out[1]["error"]
  assert out[2]["score"] == pytest.approx(float(model.score(np.array([[5, 6, 1]]), np.array([[7, 8, 1]]))[0]),
                                          rel=1e-5)
  assert out[3]["error"] == '"target" must be a string or a list of integer ids, got a number'
  assert out[4]["error"] == '"target" must be a list of integer ids, got 8.0 at position 1'


def test_training_spellings_inputs_and_targets(model_dir, tmp_path):
  """train.py's seq2seq records ({"inputs", "targets"}) score as the same line with "text"/"target" does; a line
  giving two spellings of one field is an error line naming both keys."""
  lines = ['{"text": "hello world", "target": "the dog"}', '{"inputs": "hello world", "targets": "the dog"}',
           '{"inputs": [5, 6, 1], "targets": [7, 8, 1]}', '{"input_ids": [5, 6, 1], "target": [7, 8, 1]}',
           '{"text": "hello", "inputs": "world", "target": "the"}', '{"input_ids": [5], "inputs": [5], "target": [7]}',
           '{"inputs": "hello", "target": "a dog", "targets": "a fox"}',
           '{"text": "a", "input_ids": [5], "inputs": "b", "target": "c"}', '{"inputs": 5, "targets": "the"}',
           '{"inputs": "hello"}']
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  r = _infer("--model", model_dir, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
             "--mode", "score", "--batch-size", "4")
  assert r.returncode == 0, r.stderr
  out = _read(tmp_path / "out.jsonl")
  assert out[1]["score"] == pytest.approx(out[0]["score"], rel=1e-6)
  assert out[2]["score"] == pytest.approx(out[3]["score"], rel=1e-6)
  assert [o.get("error") for o in out[4:]] == [
      'give either "text" or "inputs", not both', 'give either "input_ids" or "inputs", not both',
      'give either "target" or "targets", not both', 'give only one of "text", "input_ids", "inputs"',
      '"inputs" must be a string or a list of integer ids, got a number',
      'missing field "target" (or "targets") in score mode']


def test_text_past_the_vocabulary_fails_its_line_only(model_dir, big_tokenizer_dir, tmp_path):
  """A tokenizer larger than the model (here <extra_id_0> = 143 >= 140) fails the line that meets such an id, as an
  out-of-range id in "input_ids" does, and the other lines of its batch are answered."""
  lines = ['{"text": "hello world"}', '{"text": "the lazy dog <extra_id_0>"}', '{"inputs": "quick fox"}']
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  r = _infer("--model", model_dir, "--tokenizer", big_tokenizer_dir, "--input", str(tmp_path / "in.jsonl"),
             "--output", str(tmp_path / "out.jsonl"), "--batch-size", "3", "--max-new-tokens", "3")
  assert r.returncode == 0, r.stderr
  out = _read(tmp_path / "out.jsonl")
  assert out[1] == {"error": '"text" gives id 143 ("<extra_id_0>") at position 3, outside the model\'s vocabulary '
                             "[0, 140): the tokenizer does not match the model"}
  assert "output_ids" in out[0] and "output_ids" in out[2], out


def test_help_names_the_input_keys():
  r = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), "--help"], capture_output=True, text=True,
                     env={**os.environ, "PYTHONPATH": REPO}, timeout=60)
  assert r.returncode == 0, r.stderr
  for key in ("text", "input_ids", "inputs", "target", "targets"):
    assert f'"{key}"' in r.stdout, key


def test_killed_run_resumes_without_duplicates(model_dir, tmp_path):
  """In-flight batching (the default): lines of different lengths finish out of order, yet the output is written
  in order, and a run killed twice then completed equals a straight run byte for byte."""
  rng = np.random.default_rng(1)
  lines = [json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(2, 8))),
                       "max_new_tokens": int(rng.integers(1, 9))}) for _ in range(48)]
  lines[17] = "{broken"
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  args = ["--model", model_dir, "--input", str(tmp_path / "in.jsonl"), "--batch-size", "2", "--max-new-tokens", "5"]
  # The uninterrupted reference.
  r = _infer(*args, "--output", str(tmp_path / "ref.jsonl"))
  assert r.returncode == 0, r.stderr
  out = tmp_path / "out.jsonl"
  for kills in range(2):
    proc = _infer(*args, "--output", str(out), popen=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once it has written a few more lines
      if out.exists() and out.read_text().count("\n") >= 6 + 14 * kills:
        break
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  written = out.read_text().count("\n")
  assert 0 < written < len(lines), written
  earlier = sum("error" in record for record in _read(out))  # the {broken line 17, if already answered
  with open(out, "a") as f:
    f.write('{"output_ids": [1, 2')  # a torn line, as a kill mid-write would leave
  r = _infer(*args, "--output", str(out))
  assert r.returncode == 0, r.stderr
  assert f"resumed at line {written}" in r.stderr
  assert f"wrote {out}: 48 lines (1 errors, {earlier} of them from the earlier run)" in r.stderr
  assert out.read_text() == (tmp_path / "ref.jsonl").read_text()
  assert (tmp_path / "out.jsonl.run").read_text().count("\n") == 1 + len(lines)  # the record, a digest per line


def test_inflight_and_static_batching_answer_alike_with_per_line_settings(model_dir, tmp_path):
  rng = np.random.default_rng(3)
  records = []
  for i in range(18):
    record = {"text": " ".join(rng.choice(WORDS, rng.integers(2, 9))), "max_new_tokens": int(rng.integers(1, 13))}
    if i % 4 == 1:
      record.update(method="sample", temperature=1.5, top_k=int(rng.integers(0, 30)), top_p=0.9, seed=i)
    records.append(record)
  bad = [({"text": "fox", "max_new_tokens": 0}, '"max_new_tokens" must be an integer >= 1, got 0'),
         ({"text": "fox", "top_p": 2}, '"top_p" must be a number in (0, 1]'),
         ({"text": "fox", "method": "beam"}, '"method" must be "greedy" or "sample"'),
         ({"text": "fox", "temperature": "hot"}, '"temperature" must be a finite number > 0, got "hot"')]
  lines = [json.dumps(r) for r in records] + [json.dumps(r) for r, _ in bad]
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  outputs = {}
  for name, flags in (("inflight", ["--batch-size", "3"]), ("inflight2", ["--batch-size", "5"]),
                      ("static", ["--batch-size", "3", "--batching", "static"])):
    r = _infer("--model", model_dir, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / name),
               "--max-new-tokens", "20", *flags)
    assert r.returncode == 0, r.stderr
    outputs[name] = _read(tmp_path / name)
  model = t5x_lite.load(model_dir, progress=False)
  for i, record in enumerate(records):
    got = outputs["inflight"][i]["output_ids"]
    assert 1 <= len(got) <= record["max_new_tokens"]
    assert outputs["inflight2"][i]["output_ids"] == got  # other slots and neighbours: the same answer
    if "method" not in record:  # greedy: as Model.generate, and as static batching
      assert outputs["static"][i]["output_ids"] == got
      want = model.generate(np.array([model.tokenizer.encode(record["text"])]),
                            max_new_tokens=record["max_new_tokens"])[0]
      assert got == want[:len(got)].tolist()
  for (_, message), k in zip(bad, range(len(records), len(lines))):
    for name in outputs:
      assert message in outputs[name][k]["error"], (name, outputs[name][k])


def test_line_error_messages(model_dir, tmp_path):
  """Each malformed line says what it found; blank, non-UTF-8 and U+2028-holding lines keep the line count."""
  lines = [b'{"input_ids": "abc"}', b'{"input_ids": [1.5, 2]}', b'{"input_ids": [true, false]}',
           b'{"input_ids": [[5, 6]]}', b'{"input_ids": [5, "6"]}', b'{"text": 5}', b'',
           b'{"text": "hello", "input_ids": [5, 6]}', b'   ', b'{"text": "\xff"}',
           '{"text": "hello\u2028world"}'.encode(), b'{"input_ids": [5, 6, 1]}\r']
  (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  r = _infer("--model", model_dir, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
             "--batch-size", "4", "--max-new-tokens", "3")
  assert r.returncode == 0, r.stderr
  out = _read(tmp_path / "out.jsonl")
  assert [o.get("error") for o in out] == [
      '"input_ids" must be a list of integer ids, got a string',
      '"input_ids" must be a list of integer ids, got 1.5 at position 0',
      '"input_ids" must be a list of integer ids, got true at position 0',
      '"input_ids" must be a list of integer ids, got a list at position 0',
      '"input_ids" must be a list of integer ids, got "6" at position 1',
      '"text" must be a string, got a number',
      "empty line",
      'give either "text" or "input_ids", not both',
      "empty line",
      "invalid UTF-8 at byte 10",
      None, None]
  assert "output_ids" in out[10] and "output_ids" in out[11]
  assert f"{len(lines)} lines (10 errors)" in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--method", "beam", "--num-beams", "0"], "--num-beams must be an integer >= 1 for --method beam, got 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["--method", "sample", "--temperature", "0"], "--temperature must be a finite number > 0 for --method sample"),
    (["--method", "sample", "--temperature", "nan"], "--temperature must be a finite number > 0"),
    (["--max-input-length", "0"], "--max-input-length must be an integer >= 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--method", "beam", "--length-penalty", "inf"], "--length-penalty must be a finite number"),
    (["--method", "beam", "--length-penalty", "100"], "--length-penalty 100.0 is too large for --max-new-tokens 64"),
    (["--seed", str(2 ** 64)], "--seed must be an integer below 2**62"),
])
def test_bad_settings_refused_before_loading(tmp_path, flags, message):
  """Exit 2 argparse-style before the model loads (the model path does not even exist), nothing written."""
  (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
  r = _infer("--model", str(tmp_path / "no_model"), "--input", str(tmp_path / "in.jsonl"),
             "--output", str(tmp_path / "out.jsonl"), *flags)
  assert r.returncode == 2, r.stderr
  assert f"infer.py: error: {message}" in r.stderr
  assert not (tmp_path / "out.jsonl").exists()


def test_output_that_is_the_input_refused(tmp_path):
  text = '{"text": "hello"}\n{"text": "world"}\n'
  (tmp_path / "in.jsonl").write_text(text)
  os.symlink(tmp_path / "in.jsonl", tmp_path / "link.jsonl")
  for output in (str(tmp_path / "in.jsonl"), str(tmp_path / "." / "in.jsonl"), str(tmp_path / "link.jsonl")):
    r = _infer("--model", str(tmp_path / "no_model"), "--input", str(tmp_path / "in.jsonl"), "--output", output)
    assert r.returncode == 2, r.stderr
    assert f"infer.py: error: --output {output} is the input file" in r.stderr
  assert (tmp_path / "in.jsonl").read_text() == text


@pytest.mark.parametrize("existing, problem", [
    (b'{"output_ids": [5, 1]}\ngarbage\n', "line 2 is not JSON"),
    (b'{"output_ids": [5, 1]}\n[1, 2]\n', "line 2 is not a JSON object"),
    (b'{"text": "hello"}\n', "line 1 has none of the keys output, output_ids, score, error"),
    (b'{"output": "hi"}\n', 'line 1 has none of "output_ids", "score", "error"'),
    (b'{"error": "x"}\nhello', "line 2 is cut off and does not begin like an output line"),
])
def test_resume_refuses_a_file_that_is_not_our_output(tmp_path, existing, problem):
  """The file is left byte for byte as it was (no torn-line cut either), --overwrite or not."""
  (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n' * 3)
  (tmp_path / "out.jsonl").write_bytes(existing)
  for overwrite in ([], ["--overwrite"]):
    r = _infer("--model", str(tmp_path / "no_model"), "--input", str(tmp_path / "in.jsonl"),
               "--output", str(tmp_path / "out.jsonl"), *overwrite)
    assert r.returncode == 2, r.stderr
    assert f"infer.py: error: {tmp_path / 'out.jsonl'} {problem}: it does not look like infer.py" in r.stderr
    assert (tmp_path / "out.jsonl").read_bytes() == existing


def test_rerun_resumes_only_what_the_same_run_would_answer(model_dir, big_tokenizer_dir, tmp_path):
  """OUT.jsonl.run records the model, tokenizer, answer-changing settings and input lines: a rerun differing in
  any of them exits 2 before the model loads, naming the difference, the files left as they were; batch size and
  settings the method ignores resume; --overwrite answers afresh."""
  inp, out, record = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "out.jsonl.run"
  lines = ['{"text": "hello world"}', '{"text": "the lazy dog"}', '{"input_ids": [5, 6, 1]}']
  inp.write_text("\n".join(lines) + "\n")
  args = ["--model", model_dir, "--input", str(inp), "--output", str(out), "--max-new-tokens", "3"]
  r = _infer(*args, "--batch-size", "2")
  assert r.returncode == 0, r.stderr
  answers, recorded = out.read_bytes(), record.read_bytes()
  other_model = tmp_path / "other_model"  # the same weights, written anew: other files to a cheap fingerprint
  shutil.copytree(model_dir, other_model, copy_function=shutil.copyfile)
  for flags, difference in [
      (["--method", "beam"], "--method: greedy -> beam"),
      (["--max-new-tokens", "4"], "--max-new-tokens: 3 -> 4"),
      (["--mode", "score"], "--mode: generate -> score"),
      (["--dtype", "bfloat16"], "--dtype: float32 -> bfloat16"),
      (["--max-input-length", "100"], "--max-input-length: 2048 -> 100"),
      (["--tokenizer", big_tokenizer_dir], f"--tokenizer: (none) -> {os.path.realpath(big_tokenizer_dir)}"),
      (["--model", str(other_model)], f"--model: {os.path.realpath(model_dir)} -> {other_model}")]:
    r = _infer(*args, *flags)
    assert r.returncode == 2, (flags, r.stderr)
    assert (f"infer.py: error: {out} holds 3 answers of another run ({difference}): pass --overwrite to answer "
            "every line afresh, or give another --output") in r.stderr
  lines[1] = '{"text": "the lazy fox"}'  # a corrected input line among those answered
  inp.write_text("\n".join(lines) + "\n")
  r = _infer(*args)
  assert r.returncode == 2 and "(input line 2 changed since its answer was written)" in r.stderr, r.stderr
  assert out.read_bytes() == answers and record.read_bytes() == recorded
  lines[1] = '{"text": "the lazy dog"}'
  lines.append('{"text": "a new line"}')
  inp.write_text("\n".join(lines) + "\n")
  record.write_bytes(recorded + b"0123456789abcdef\n01234")  # as a kill after a batch's digests, before its answers
  r = _infer(*args, "--batch-size", "1", "--temperature", "0.5", "--seed", "7")  # greedy ignores both
  assert r.returncode == 0, r.stderr
  assert "4 lines (0 errors, 0 of them from the earlier run), resumed at line 3" in r.stderr
  assert out.read_bytes().startswith(answers)
  assert record.read_bytes() == recorded + inference_record.line_digest(lines[3].encode()).encode() + b"\n"
  r = _infer(*args, "--max-input-length", "100", "--overwrite")  # a change that compiles nothing new
  assert r.returncode == 0 and "resumed" not in r.stderr, r.stderr
  assert len(_read(out)) == 4 and json.loads(record.read_text().split("\n")[0])["settings"]["--max-input-length"] == 100
  assert len(record.read_text().split("\n")) == 1 + 4 + 1  # the record, a digest per answer, the final newline


def test_output_without_a_record_refused(tmp_path):
  """An output written before infer.py kept records: what made its answers is unknown; --overwrite is named."""
  (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n' * 3)
  (tmp_path / "out.jsonl").write_text('{"output_ids": [5, 1]}\n{"error": "x"}\n')
  r = _infer("--model", str(tmp_path / "no_model"), "--input", str(tmp_path / "in.jsonl"),
             "--output", str(tmp_path / "out.jsonl"))
  assert r.returncode == 2, r.stderr
  assert (f"infer.py: error: {tmp_path / 'out.jsonl'} holds 2 answers but no record of what produced them "
          f"({tmp_path / 'out.jsonl.run'}): pass --overwrite") in r.stderr
  assert not (tmp_path / "out.jsonl.run").exists()


@pytest.mark.parametrize("where", ["missing folder", "file as folder", "unwritable folder"])
def test_unwritable_output_refused_before_loading(tmp_path, where):
  (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
  if where == "missing folder":
    output, message = tmp_path / "no" / "out.jsonl", f"the folder {tmp_path / 'no'} does not exist"
  elif where == "file as folder":
    output, message = tmp_path / "in.jsonl" / "out.jsonl", f"{tmp_path / 'in.jsonl'} is not a folder"
  else:  # root may write in a read-only folder: /proc takes no new files even from root
    folder = "/proc" if os.geteuid() == 0 else tmp_path / "read_only"
    if folder != "/proc":
      folder.mkdir(mode=0o555)
    output, message = os.path.join(folder, "out.jsonl"), f"cannot create files in {folder}"
  r = _infer("--model", str(tmp_path / "no_model"), "--input", str(tmp_path / "in.jsonl"), "--output", str(output))
  assert r.returncode == 2, r.stderr
  assert f"infer.py: error: --output {output}: {message}" in r.stderr
