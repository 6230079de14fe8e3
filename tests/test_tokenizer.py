"""t5x_lite.tokenizer against transformers' own tokenizers on tiny SentencePiece models trained here."""

import io
import json
import random
import shutil

import numpy as np
import pytest
import sentencepiece as spm

transformers = pytest.importorskip("transformers")

from conftest import T5_TINY, build_hf  # noqa: E402

import t5x_lite  # noqa: E402
from t5x_lite.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer  # noqa: E402


def _corpus():
  rng = random.Random(0)
  words = ("the quick brown fox jumps over a lazy dog hello world machine learning model training data "
           "token sentence piece language translate english german summarize question answer").split()
  syllables = "ka ti ro mu pe la so ne vi da gor bel tran sch ing ed ly ment tion er".split()
  words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
  lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".!?,")
           for _ in range(2000)]
  return lines + ["Numbers 0123456789 and CAPS ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz"] * 5


def _train(path, **kwargs):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=model, minloglevel=2, **kwargs)
  path.write_bytes(model.getvalue())


T5_SPM = dict(vocab_size=300, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
GEMMA_SPM = dict(vocab_size=420, model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                 eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True, split_digits=True,
                 normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                 allow_whitespace_only_pieces=True)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("t5")
  _train(d / "spiece.model", **T5_SPM)
  (d / "config.json").write_text(json.dumps({"model_type": "t5"}))
  return d


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("gemma")
  _train(d / "tokenizer.model", **GEMMA_SPM)
  return d


# Whitespace, special tokens written in text, characters outside the tiny vocabulary, unicode normalisation.
TEXTS = [
    "Hello world", "the quick brown fox jumps over the lazy dog.", "", " ", "   ", "\t", "\n",
    "two  spaces", "many     spaces", "tab\tseparated\twords", "new\nline", "crlf\r\nline", "\n\nparagraph\n\n",
    " leading", "trailing ", "  both  ", "\t mixed \n whitespace \t",
    "x<extra_id_0>y", "x <extra_id_0> y", "<extra_id_99> end", "<extra_id_100> is not a sentinel",
    "<extra_id_ broken", "hello</s>", "hello </s> world", "</s></s>", "<pad><unk> x", "<s> and <bos> <eos>",
    "caf\u00e9 na\u00efve \u00fcber", "\u65e5\u672c\u8a9e ok", "emoji \U0001f600\U0001f600 x",
    "\ufb01 \u2460 \uff26\uff55\uff4c\uff4c", "a\u00a0b\u3000c\u2028d\u200be\ufeff",
    "\u2581already metaspace\u2581", "e\u0301 vs \u00e9", "ctrl\x00\x1cchars",
    "Numbers 12345 and punctuation!?,.", "<mask> <unk> <0x41>",
]


def _fuzz_texts(n=300, seed=1):
  rng = random.Random(seed)
  parts = list("abcxyz ABC019.,!?'") + [" ", "  ", "\t", "\n", "\u3000", "\u2581", "\u00e9", "\ufb01", "\u65e5",
                                         "\U0001f600", "the ", "world", "<extra_id_0>", "<extra_id_7>", "</s>",
                                         "<pad>", "<unk>", "<bos>", "<eos>", "<mask>", "<"]
  return ["".join(rng.choice(parts) for _ in range(rng.randint(0, 15))) for _ in range(n)]


def _random_ids(vocab, n=300, seed=2):
  rng = random.Random(seed)
  return [[rng.randrange(vocab) for _ in range(rng.randint(0, 10))] for _ in range(n)]


def _assert_same_encoding(ours, ref, texts):
  mismatches = [(t, ours.encode(t), ref.encode(t)) for t in texts if ours.encode(t) != ref.encode(t)]
  assert not mismatches, mismatches[:5]


def _assert_same_decoding(ours, ref, id_lists):
  for skip in (True, False):
    mismatches = [(ids, ours.decode(ids, skip_special_tokens=skip), ref.decode(ids, skip_special_tokens=skip))
                  for ids in id_lists
                  if ours.decode(ids, skip_special_tokens=skip) != ref.decode(ids, skip_special_tokens=skip)]
    assert not mismatches, (skip, mismatches[:5])


# --- T5 -----------------------------------------------------------------------------------------------------
def test_t5_encode_matches_transformers(t5_dir):
  ours, ref = load_tokenizer(t5_dir, "t5"), transformers.AutoTokenizer.from_pretrained(t5_dir)
  assert type(ref).__name__ == "T5Tokenizer"
  _assert_same_encoding(ours, ref, TEXTS + _fuzz_texts())


def test_t5_decode_matches_transformers(t5_dir):
  ours, ref = load_tokenizer(t5_dir, "t5"), transformers.T5Tokenizer.from_pretrained(t5_dir)
  encoded = [ref.encode(t) for t in TEXTS + _fuzz_texts(100)]
  # The model's vocabulary (32100 vs 32128 in real T5) can exceed the tokenizer's: ids past it are dropped.
  _assert_same_decoding(ours, ref, encoded + _random_ids(len(ref) + 5) + [[27, 27, 251], [len(ref) + 3, 27]])


def test_t5_special_ids_match_transformers(t5_dir):
  ours, ref = load_tokenizer(t5_dir, "t5"), transformers.T5Tokenizer.from_pretrained(t5_dir)
  assert ours.vocab_size == len(ref) == 400
  assert (ours.pad_id, ours.eos_id, ours.unk_id, ours.bos_id) == (ref.pad_token_id, ref.eos_token_id,
                                                                 ref.unk_token_id, ref.bos_token_id)
  assert ours.bos_id is None
  for n in (0, 1, 57, 99):
    assert ours.sentinel_id(n) == ref.convert_tokens_to_ids(f"<extra_id_{n}>")
  with pytest.raises(ValueError):
    ours.sentinel_id(100)
  assert ours.encode_batch(["a b", ""]) == [ref.encode("a b"), ref.encode("")]
  assert ours.decode_batch([[27, 251, 1]]) == [ref.decode([27, 251, 1], skip_special_tokens=True)]


def test_t5_tokenizer_config_options(t5_dir, tmp_path):
  d = tmp_path / "t5cfg"
  shutil.copytree(t5_dir, d)
  # transformers' T5Tokenizer ignores add_eos_token / add_bos_token; extra_ids and cleanup count.
  (d / "tokenizer_config.json").write_text(json.dumps(
      {"extra_ids": 10, "clean_up_tokenization_spaces": True, "add_eos_token": False, "add_bos_token": True}))
  ours, ref = load_tokenizer(d, "t5"), transformers.AutoTokenizer.from_pretrained(d)
  assert ours.vocab_size == len(ref) == 310
  texts = TEXTS + ["it 's fine , is n't it ? yes !", "<extra_id_9> <extra_id_10>"]
  _assert_same_encoding(ours, ref, texts)
  _assert_same_decoding(ours, ref, [ref.encode(t) for t in texts])


def test_t5_byte_fallback_model_never_falls_back(tmp_path):
  # HF's T5Tokenizer runs the unigram model without byte fallback even if the SentencePiece model has it.
  _train(tmp_path / "spiece.model", **{**T5_SPM, "vocab_size": 400, "byte_fallback": True})
  ours, ref = load_tokenizer(tmp_path, "t5"), transformers.T5Tokenizer.from_pretrained(tmp_path)
  texts = [t for t in TEXTS + _fuzz_texts(100) if "<0x" not in t]  # see the xfail test below
  _assert_same_encoding(ours, ref, texts)
  _assert_same_decoding(ours, ref, [ref.encode(t) for t in texts])


@pytest.mark.xfail(strict=True, reason="known gap: HF matches byte pieces such as <0x41> written in the text")
def test_t5_byte_fallback_model_literal_byte_piece(tmp_path):
  _train(tmp_path / "spiece.model", **{**T5_SPM, "vocab_size": 400, "byte_fallback": True})
  ours, ref = load_tokenizer(tmp_path, "t5"), transformers.T5Tokenizer.from_pretrained(tmp_path)
  assert ours.encode("x <0x41>") == ref.encode("x <0x41>")


# --- Gemma --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [None, {"add_bos_token": True}, {"add_bos_token": False, "add_eos_token": True},
                                    {"tokenizer_class": "GemmaTokenizer"}])
def test_gemma_matches_transformers(gemma_dir, tmp_path, config):
  d = tmp_path / "gemma"
  shutil.copytree(gemma_dir, d)
  if config is not None:
    (d / "tokenizer_config.json").write_text(json.dumps(config))
  ours, ref = load_tokenizer(d, "gemma"), transformers.GemmaTokenizer.from_pretrained(d)
  assert (ours.add_bos, ours.add_eos) == (ref.add_bos_token, ref.add_eos_token)
  assert (ours.pad_id, ours.eos_id, ours.bos_id, ours.unk_id) == (0, 1, 2, 3)
  assert (ours.pad_id, ours.eos_id, ours.bos_id, ours.unk_id) == (ref.pad_token_id, ref.eos_token_id,
                                                                 ref.bos_token_id, ref.unk_token_id)
  texts = TEXTS + _fuzz_texts(200)
  _assert_same_encoding(ours, ref, texts)
  # len(ref) includes the `<mask>` transformers appends; random ids also hit incomplete utf-8 byte runs.
  _assert_same_decoding(ours, ref, [ref.encode(t) for t in texts] + _random_ids(len(ref)))


def test_gemma_constructor_defaults_prepend_bos(gemma_dir):
  tok = SentencePieceTokenizer(gemma_dir / "tokenizer.model", family="gemma")
  ref = transformers.GemmaTokenizer.from_pretrained(gemma_dir)
  assert tok.extra_ids == 0 and tok.vocab_size == ref.vocab_size
  assert tok.encode("Hello world") == [ref.bos_token_id] + ref.encode("Hello world")


# --- ByT5 ---------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:This sequence already has")
def test_byt5_matches_transformers():
  ours, ref = ByteTokenizer(), transformers.ByT5Tokenizer()
  assert ours.vocab_size == len(ref) == 384
  assert (ours.pad_id, ours.eos_id, ours.unk_id) == (ref.pad_token_id, ref.eos_token_id, ref.unk_token_id)
  texts = TEXTS + _fuzz_texts() + ["a  </s>  b", "\t<pad>\n", "x <extra_id_124> <extra_id_125>"]
  _assert_same_encoding(ours, ref, texts)
  _assert_same_decoding(ours, ref, [ref.encode(t) for t in texts] + _random_ids(384))


# --- load_tokenizer -----------------------------------------------------------------------------------------
def test_load_tokenizer_finds_nothing_in_empty_dir(tmp_path):
  for family in ("t5", "gemma", "t5gemma2"):
    assert load_tokenizer(tmp_path, family) is None


@pytest.mark.parametrize("family,name", [("t5", "spiece.model"), ("gemma", "tokenizer.model")])
def test_load_tokenizer_corrupt_file_raises(tmp_path, family, name):
  (tmp_path / name).write_bytes(b"this is not a sentencepiece model")
  with pytest.raises(ValueError, match=name):
    load_tokenizer(tmp_path, family)


@pytest.mark.parametrize("file,content", [
    ("config.json", {"model_type": "t5", "tokenizer_class": "ByT5Tokenizer"}),
    ("tokenizer_config.json", {"tokenizer_class": "ByT5Tokenizer"})])
def test_load_tokenizer_recognises_byt5(tmp_path, file, content):
  (tmp_path / file).write_text(json.dumps(content))
  tok = load_tokenizer(tmp_path, "t5")
  assert isinstance(tok, ByteTokenizer)
  assert tok.encode("héllo <extra_id_3>") == transformers.ByT5Tokenizer().encode("héllo <extra_id_3>")


# --- tokenizer.json without a SentencePiece file (what transformers 5 saves) --------------------------------
def _saved_by_transformers(src, out, cls=transformers.AutoTokenizer):
  """`out` as transformers 5 writes a tokenizer loaded from `src`: tokenizer.json + tokenizer_config.json."""
  cls.from_pretrained(src).save_pretrained(out)
  assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
  return out


@pytest.mark.parametrize("spm_options,config", [
    ({}, None), ({}, {"extra_ids": 10, "clean_up_tokenization_spaces": True}),
    ({"vocab_size": 400, "byte_fallback": True}, None), ({"normalization_rule_name": "identity"}, None),
    ({}, False)])  # False: tokenizer.json alone, its tokenizer_config.json removed
def test_t5_tokenizer_json_alone_matches_transformers(tmp_path, spm_options, config):
  src = tmp_path / "src"
  src.mkdir()
  _train(src / "spiece.model", **{**T5_SPM, **spm_options})
  (src / "config.json").write_text(json.dumps({"model_type": "t5"}))
  if config:
    (src / "tokenizer_config.json").write_text(json.dumps(config))
  d = _saved_by_transformers(src, tmp_path / "saved")
  if config is False:
    (d / "tokenizer_config.json").unlink()
    (d / "config.json").write_text(json.dumps({"model_type": "t5"}))  # how AutoTokenizer finds T5Tokenizer then
  ours, ref = load_tokenizer(d, "t5"), transformers.AutoTokenizer.from_pretrained(d)
  assert type(ref).__name__ == "T5Tokenizer" and ours is not None
  assert ours.vocab_size == len(ref)
  assert (ours.pad_id, ours.eos_id, ours.unk_id) == (ref.pad_token_id, ref.eos_token_id, ref.unk_token_id)
  for n in (0, ours.extra_ids - 1):
    assert ours.sentinel_id(n) == ref.convert_tokens_to_ids(f"<extra_id_{n}>")
  # Byte pieces are plain pieces to transformers here, so even their names in text match (unlike spiece.model).
  texts = TEXTS + _fuzz_texts() + ["x <0x41> y", "<0x41>", "it 's fine , is n't it ?"]
  _assert_same_encoding(ours, ref, texts)
  _assert_same_decoding(ours, ref, [ref.encode(t) for t in texts] + _random_ids(len(ref) + 5))


def test_model_directory_with_tokenizer_json_alone(t5_dir, tmp_path):
  """The README example on a directory transformers 5 saved: `model.tokenizer` was None (AttributeError)."""
  d = _saved_by_transformers(t5_dir, tmp_path / "model")
  build_hf(transformers.T5ForConditionalGeneration, transformers.T5Config(**{**T5_TINY, "vocab_size": 400}), d)
  model = t5x_lite.load(str(d), progress=False)
  text = "translate English to German: Hello"
  ids = np.array([model.tokenizer.encode(text)])
  assert ids[0].tolist() == transformers.AutoTokenizer.from_pretrained(d).encode(text)
  model.save(str(tmp_path / "ckpt"))  # tokenizer.json travels with our checkpoint too
  assert t5x_lite.load(str(tmp_path / "ckpt")).tokenizer.encode(text) == ids[0].tolist()


@pytest.mark.parametrize("edit,reason", [
    (lambda tok, cfg: tok["added_tokens"].append({"id": 50, "content": tok["model"]["vocab"][50][0],
                                                  "special": False}), "is not special"),
    (lambda tok, cfg: cfg.update(tokenizer_class="PreTrainedTokenizerFast"), "names 'PreTrainedTokenizerFast'"),
    (lambda tok, cfg: cfg.update(extra_ids=5), "ends in 100 sentinels"),
    (lambda tok, cfg: tok["model"].update(type="BPE"), "holds a BPE model"),
    (lambda tok, cfg: cfg.pop("tokenizer_class"), "only for model_type t5 or mt5, not 'umt5'")],
    ids=["non_special_added_token", "other_tokenizer_class", "other_extra_ids", "bpe", "umt5_without_class"])
def test_t5_tokenizer_json_it_cannot_reproduce_warns(t5_dir, tmp_path, edit, reason):
  d = _saved_by_transformers(t5_dir, tmp_path / "saved")
  (d / "config.json").write_text(json.dumps({"model_type": "umt5"}))
  tok, cfg = json.loads((d / "tokenizer.json").read_text()), json.loads((d / "tokenizer_config.json").read_text())
  edit(tok, cfg)
  (d / "tokenizer.json").write_text(json.dumps(tok))
  (d / "tokenizer_config.json").write_text(json.dumps(cfg))
  with pytest.warns(UserWarning, match=rf"^{d}: no spiece.model, and its tokenizer.json cannot be rebuilt exactly: "
                                       rf".*{reason}.*Copy spiece.model from the original checkpoint"):
    assert load_tokenizer(d, "t5") is None


def test_gemma_tokenizer_json_alone_warns(gemma_dir, tmp_path):
  d = _saved_by_transformers(gemma_dir, tmp_path / "saved", transformers.GemmaTokenizer)
  with pytest.warns(UserWarning, match=rf"^{d}: no tokenizer.model, .*`tokenizers` package.*Copy tokenizer.model "
                                       "from the original checkpoint"):
    assert load_tokenizer(d, "gemma") is None


def test_t5_corrupt_tokenizer_json_raises(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
  (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Unigram", "vocab": [["a"]]}}')
  with pytest.raises(ValueError, match="tokenizer.json: not a tokenizer.json this can read"):
    load_tokenizer(tmp_path, "t5")
