"""t5x_lite.data.pipeline: determinism, per-host shares of the global batch, exact resume from a saved state."""

import io
import json
import re

import numpy as np
import pytest

from t5x_lite import data
from t5x_lite.tokenizer import SentencePieceTokenizer


class NumberTokenizer:
  """Words are numbers: "5 17" -> [8, 20] (3 ids reserved for pad/EOS/unk), EOS appended as T5's tokenizer
  does; 100 sentinels above 20000 pieces, counting down."""
  extra_ids, pad_id, eos_id, bos_id, add_eos = 100, 0, 1, None, True

  def encode(self, text):
    return [int(w) + 3 for w in text.split()] + [self.eos_id]

  def sentinel_id(self, n):
    return 20000 + self.extra_ids - 1 - n


TOK = NumberTokenizer()
# Document i holds the words 100 i, 100 i + 1, ...: a token tells which document it came from.
DOCS = [" ".join(str(100 * i + j) for j in range(3 + (i * 37) % 90)) for i in range(200)]


def _doc_of(token):
  return (int(token) - 3) // 100


def _batches(n, config, **kw):
  it = data.make_batches(config, TOK, documents=DOCS, **kw)
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _segments(tokens_BL, segment_ids_BL):
  """Packed rows -> their examples' tokens, row by row."""
  return [tokens[seg == s].tolist() for tokens, seg in zip(tokens_BL, segment_ids_BL)
          for s in range(1, seg.max() + 1)]


UL2 = data.DataConfig(objective="ul2", batch_size=4, inputs_length=64, targets_length=64, seed=3)
LM = data.DataConfig(objective="lm", decoder_only=True, batch_size=4, length=48, seed=5)


def test_ul2_batches_are_deterministic_and_well_formed():
  first = _batches(4, UL2)
  _assert_same(first, _batches(4, UL2))
  other = _batches(1, data.DataConfig(**{**UL2.__dict__, "seed": 4}))[0]
  assert not np.array_equal(first[0]["input_ids"], other["input_ids"])
  mode_ids = {TOK.sentinel_id(99), TOK.sentinel_id(98), TOK.sentinel_id(97)}  # reserved for [NLU] [NLG] [S2S]
  for b in first:
    assert b["input_ids"].shape == (4, 64) and b["decoder_target_ids"].shape == (4, 64)
    assert all(v.dtype == (np.float32 if k.endswith("weights") else np.int32) for k, v in b.items())
    inputs = _segments(b["input_ids"], b["encoder_segment_ids"])
    targets = _segments(b["decoder_target_ids"], b["decoder_segment_ids"])
    assert len(inputs) == len(targets)
    for i, t in zip(inputs, targets):
      assert i[0] in mode_ids and i[-1] == t[-1] == TOK.eos_id
      assert len({_doc_of(x) for x in i[1:] + t if x < 20000 and x != TOK.eos_id}) <= 1  # one document each
    for dec_in, t in zip(_segments(b["decoder_input_ids"], b["decoder_segment_ids"]), targets):
      assert dec_in == [0] + t[:-1]
    np.testing.assert_array_equal(b["decoder_loss_weights"], b["decoder_segment_ids"] > 0)


@pytest.mark.parametrize("config", [LM, UL2], ids=["lm", "ul2"])
def test_hosts_read_disjoint_shares_that_make_up_the_global_batch(config):
  single = _batches(5, config, process_index=0, process_count=1)
  hosts = [_batches(5, config, process_index=i, process_count=2) for i in range(2)]
  for whole, h0, h1 in zip(single, *hosts):
    assert h0["segment_ids" if config.decoder_only else "encoder_segment_ids"].shape[0] == 2
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), whole[k], err_msg=k)
  key = ("target_ids", "segment_ids") if config.decoder_only else ("decoder_target_ids", "decoder_segment_ids")
  docs = [{_doc_of(x) for b in h for seg in _segments(b[key[0]], b[key[1]]) for x in seg if 3 <= x < 20000}
          for h in hosts]
  assert docs[0] and docs[1] and not docs[0] & docs[1]
  with pytest.raises(ValueError):
    data.make_batches(config, TOK, documents=DOCS, process_index=0, process_count=3)  # 4 rows over 3 hosts


@pytest.mark.parametrize("config", [
    UL2,
    data.DataConfig(**{**UL2.__dict__, "packing_bins": 3, "objective": "span_corruption"}),
    LM,
    data.DataConfig(**{**LM.__dict__, "objective": "ul2", "length": 96, "prefetch": 2}),
], ids=["ul2", "span_corruption_3_bins", "lm", "ul2_decoder_only_prefetch"])
def test_resume_from_saved_state_sees_the_uninterrupted_batches(config):
  it = data.make_batches(config, TOK, documents=DOCS, process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = [next(it) for _ in range(4)]
  resumed = data.make_batches(config, TOK, documents=DOCS, process_index=0, process_count=1)
  resumed.set_state(state)
  _assert_same([next(resumed) for _ in range(4)], expected)
  if config.prefetch:
    it.close()
    resumed.close()


def test_states_saved_by_two_hosts_resume_on_one_and_on_four():
  """Elastic resume: the lanes two hosts saved continue on one host (or four) with the very batches the two would
  have read next, as rows of the global batch."""
  hosts = [data.make_batches(UL2, TOK, documents=DOCS, process_index=i, process_count=2) for i in range(2)]
  for it in hosts:
    for _ in range(3):
      next(it)
  lanes = data.pipeline.lanes_of_states([json.loads(json.dumps(it.get_state())) for it in hosts])
  expected = [np.concatenate(rows) for rows in zip(*[[next(it)["input_ids"] for _ in range(3)] for it in hosts])]
  for count in (1, 4):
    resumed = [data.make_batches(UL2, TOK, documents=DOCS, process_index=i, process_count=count) for i in range(count)]
    for i, it in enumerate(resumed):
      it.set_state(data.pipeline.host_state(lanes, process_index=i, process_count=count))
    got = [np.concatenate(rows) for rows in zip(*[[next(it)["input_ids"] for _ in range(3)] for it in resumed])]
    _assert_same([{"input_ids": g} for g in got], [{"input_ids": e} for e in expected])


def test_saved_lanes_are_read_from_every_process_file_or_named_missing(tmp_path):
  """checkpoints.saved_data_lanes: the lanes of process 0 then 1 (grain's process_<i>-of-<n>.json); a missing or
  unreadable file is named."""
  from t5x_lite.training.checkpoints import saved_data_lanes  # pylint: disable=import-outside-toplevel
  hosts = [data.make_batches(UL2, TOK, documents=DOCS, process_index=i, process_count=2) for i in range(2)]
  next(hosts[0])
  (tmp_path / "7" / "data").mkdir(parents=True)
  (tmp_path / "7" / "data" / "process_0-of-2.json").write_text(json.dumps(hosts[0].get_state()))
  with pytest.raises(ValueError, match="incomplete .*missing process_1-of-2.json"):
    saved_data_lanes(str(tmp_path), 7)
  (tmp_path / "7" / "data" / "process_1-of-2.json").write_text(json.dumps(hosts[1].get_state())[:-5])
  with pytest.raises(ValueError, match="process_1-of-2.json is not a data iterator state"):
    saved_data_lanes(str(tmp_path), 7)
  (tmp_path / "7" / "data" / "process_1-of-2.json").write_text(json.dumps(hosts[1].get_state()))
  assert saved_data_lanes(str(tmp_path), 7) == hosts[0].get_state()["parents"] + hosts[1].get_state()["parents"]


def test_another_batch_size_resumes_where_no_document_is_skipped():
  """allow_batch_size_change: 4 rows -> 2 rows (no shuffle, so a document's index is its place in the stream): the
  new rows begin at the returned document, and every document before it was read before the change."""
  config = data.DataConfig(**{**LM.__dict__, "shuffle": False})
  it = data.make_batches(config, TOK, documents=DOCS, process_index=0, process_count=1)
  before = {_doc_of(t) for _ in range(5) for t in next(it)["target_ids"].ravel() if t > 1}
  smaller = data.DataConfig(**{**config.__dict__, "batch_size": 2})
  resumed = data.make_batches(smaller, TOK, documents=DOCS, process_index=0, process_count=1)
  lanes, start = data.pipeline.rebatched_lanes(data.pipeline.lanes_of_states([it.get_state()]), 2,
                                               resumed.get_state()["parents"][0])
  resumed.set_state(data.pipeline.host_state(lanes, process_index=0, process_count=1))
  after = {_doc_of(t) for _ in range(5) for t in next(resumed)["target_ids"].ravel() if t > 1}
  assert 0 < start < max(before)
  assert set(range(start)) <= before
  assert min(after) == start


def test_lm_epoch_covers_every_document_once_in_order_of_the_shuffle(tmp_path):
  (tmp_path / "a.txt").write_text("\n".join(DOCS[:30]) + "\n\n")
  (tmp_path / "b.txt").write_text("\n".join(DOCS[30:60]))
  docs = data.read_documents(str(tmp_path / "*.txt"))
  assert docs == DOCS[:60]
  config = data.DataConfig(objective="lm", decoder_only=True, batch_size=1, length=64, num_epochs=1, packing_bins=1,
                           files=(str(tmp_path / "*.txt"),), seed=9)
  batches = list(data.make_batches(config, TOK, process_index=0, process_count=1))
  stream = [x for b in batches for seg in _segments(b["target_ids"], b["segment_ids"]) for x in seg]
  # Each document once, whole, followed by its EOS, in a shuffled order.
  order = [_doc_of(x) for x in stream if x != TOK.eos_id]
  order = [d for k, d in enumerate(order) if k == 0 or d != order[k - 1]]
  assert sorted(order) == list(range(60)) and order != list(range(60))
  assert stream.count(TOK.eos_id) == 60
  for b in batches:
    np.testing.assert_array_equal(b["loss_weights"], b["segment_ids"] > 0)


def test_seq2seq_from_jsonl(tmp_path):
  records = [{"inputs": " ".join(map(str, range(i, i + 1 + i % 9))), "targets": " ".join(map(str, range(i % 5 + 1)))}
             for i in range(40)]
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in records))
  config = data.DataConfig(objective="seq2seq", batch_size=2, inputs_length=6, targets_length=4, shuffle=False,
                           num_epochs=1, files=(str(path),))
  batches = list(data.make_batches(config, TOK, process_index=0, process_count=1))
  trim = lambda text, n: [int(w) + 3 for w in text.split()][:n - 1] + [TOK.eos_id]  # EOS kept after trimming
  complete = []
  for j in range(2):  # lane j (row j of every batch) holds records j, j+2, ... in order
    want = [(trim(r["inputs"], 6), trim(r["targets"], 4)) for r in records[j::2]]
    got = list(zip(_segments(np.stack([b["input_ids"][j] for b in batches]),
                             np.stack([b["encoder_segment_ids"][j] for b in batches])),
                   _segments(np.stack([b["decoder_target_ids"][j] for b in batches]),
                             np.stack([b["decoder_segment_ids"][j] for b in batches]))))
    assert got == want[:len(got)] and len(got) > 10
    complete.append(got == want)
  assert any(complete)  # the epoch ends when the first lane runs dry; the other loses at most its open rows
  # Decoder-only: inputs + targets in one row, loss on the targets only.
  dec = data.DataConfig(**{**config.__dict__, "decoder_only": True, "length": 10})
  b = next(data.make_batches(dec, TOK, process_index=0, process_count=1))
  first = records[0]
  seg = b["segment_ids"][0] == 1
  want = trim(first["inputs"], 10) + trim(first["targets"], 9)
  assert b["target_ids"][0][seg].tolist() == want
  assert b["loss_weights"][0][seg].tolist() == [0] * (len(want) - 2) + [1, 1]



def test_bad_documents_are_named_by_file_and_line_before_training(tmp_path):
  good = json.dumps({"inputs": "1 2", "targets": "3"})
  seq2seq = data.DataConfig(objective="seq2seq", batch_size=2, inputs_length=6, targets_length=4)
  for n, (line, message) in enumerate([(json.dumps({"inputs": "1 2"}), 'no "targets" field'),
                                       (json.dumps({"inputs": "1", "targets": 7}), '"targets" must be a string'),
                                       (json.dumps(["1", "2", "3"]), "not a JSON object (a list)"),
                                       ('"just a string"', "not a JSON object (a str)")]):
    path = tmp_path / f"bad{n}.jsonl"
    path.write_text("\n".join([good, "", line, good]) + "\n")  # the bad record is on line 3
    config = data.DataConfig(**{**seq2seq.__dict__, "files": (str(path),)})
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
      data.make_batches(config, TOK, process_index=0, process_count=1)
  text = tmp_path / "latin1.txt"
  text.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
  with pytest.raises(ValueError, match=re.escape(f"{text}:2: not UTF-8 text")):
    data.read_documents(str(text))
  bom = tmp_path / "bom.txt"
  bom.write_bytes("\ufeffhello\nworld\n".encode("utf-8"))
  docs = data.read_documents(str(bom))
  assert list(docs) == ["hello", "world"] and docs.origin(1) == f"{bom}:2"
  with pytest.raises(IsADirectoryError, match="is a directory"):
    data.read_documents(str(tmp_path))

def _sentencepiece(tmp_path):
  import sentencepiece as spm
  rng = np.random.default_rng(0)
  words = "the quick brown fox jumps over a lazy dog data model token span corruption mixture".split()
  lines = [" ".join(rng.choice(words, rng.integers(3, 15))) for _ in range(500)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, minloglevel=2,
                                 vocab_size=40, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  (tmp_path / "spiece.model").write_bytes(model.getvalue())
  return SentencePieceTokenizer(tmp_path / "spiece.model"), lines


def test_ul2_with_a_sentencepiece_tokenizer(tmp_path):
  tok, lines = _sentencepiece(tmp_path)
  config = data.DataConfig(objective="ul2", batch_size=2, inputs_length=48, targets_length=48)
  mixture = data.make_mixture(config, tok)
  assert [d.mode_ids for d in mixture.denoisers] == [(tok.sentinel_id(99),)] * 2 + [(tok.sentinel_id(98),)] * 4 + [
      (tok.sentinel_id(97),)]
  assert mixture.first_sentinel_id == tok.sentinel_id(0) and mixture.num_sentinels == 97
  assert data.token_ids(tok, lines[0]) == tok.encode(lines[0])[:-1]  # the tokenizer's own EOS is dropped
  b = next(data.make_batches(config, tok, documents=lines, process_index=0, process_count=1))
  for i in _segments(b["input_ids"], b["encoder_segment_ids"]):
    assert i[0] in {tok.sentinel_id(97), tok.sentinel_id(98), tok.sentinel_id(99)} and i[-1] == tok.eos_id
  assert (b["encoder_segment_ids"] > 0).mean() > 0.8  # packing fills the rows


def test_each_example_draws_from_its_stream_index():
  # Eight copies of one document, read in order: each copy is its own example with its own task and noise.
  config = data.DataConfig(objective="ul2", batch_size=1, inputs_length=128, targets_length=128, shuffle=False,
                           packing_bins=1, pack=False)
  it = data.make_batches(config, TOK, documents=[DOCS[150]] * 8, process_index=0, process_count=1)
  rows = {next(it)["input_ids"].tobytes() for _ in range(8)}
  assert len(rows) == 8
