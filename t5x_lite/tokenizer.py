"""Tokenizers that give transformers' ids without depending on transformers.

Owns text <-> id conversion for every family: `SentencePieceTokenizer` (T5/mT5 `spiece.model`, Gemma
`tokenizer.model`), `ByteTokenizer` (ByT5) and `load_tokenizer`, which picks one for a model directory.
Parity target is transformers 5.23: `T5Tokenizer`/`GemmaTokenizer` built by `from_pretrained(dir)` from the
SentencePiece file, `T5Tokenizer` from a `tokenizer.json` alone (as transformers 5 saves it: a SentencePiece
model is rebuilt from its Unigram vocabulary), and the slow `ByT5Tokenizer`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import warnings
from typing import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

# Rust's `char::is_whitespace`: what the `WhitespaceSplit` pre-tokenizer of HF's T5 tokenizer splits on.
_WHITESPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_META = "\u2581"  # SentencePiece's "▁", stands for a space inside pieces.
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# A serialized ModelProto field 3 (normalizer_spec) = {name: "identity", precompiled_charsmap: "",
# add_dummy_prefix: false, remove_extra_whitespaces: false}. Appended to a model proto it overrides the
# model's normaliser (a message field seen twice is merged, the last value of each scalar wins), which spares
# a protobuf dependency.
_IDENTITY_SPEC = b"\x0a\x08identity\x12\x00\x18\x00\x20\x00"
_IDENTITY_NORMALIZER = b"\x1a" + bytes([len(_IDENTITY_SPEC)]) + _IDENTITY_SPEC


def _splitter(tokens: Iterable[str]) -> re.Pattern:
  # Longest first, so that at each position the longest special token wins (HF matches leftmost-longest).
  alternatives = sorted(set(tokens), key=len, reverse=True)
  return re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")


def _clean_up_tokenization(text: str) -> str:
  """transformers' `clean_up_tokenization` (applied when tokenizer_config.json asks for it)."""
  for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
    text = text.replace(before, after)
  return text


class _Tokenizer:
  """Batch helpers shared by both tokenizers."""

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
    return [self.decode(ids, skip_special_tokens) for ids in batch]


class SentencePieceTokenizer(_Tokenizer):
  """A SentencePiece model plus the special-token handling of transformers' T5/Gemma tokenizers.

  `family="t5"` reproduces `T5Tokenizer`: the text is split at special tokens, each part is normalised with
  the model's character map and split on whitespace, and every word is encoded as "▁word" on its own. So
  runs of spaces, tabs and newlines count as one space and leading/trailing whitespace vanishes, as in
  transformers. Byte fallback is never used (a run of unknown characters is one `<unk>`). `<extra_id_N>`
  sentinels follow the pieces counting down (`<extra_id_0>` = pieces + extra_ids - 1).
  `family="gemma"` reproduces `GemmaTokenizer`: raw SentencePiece (BPE, byte fallback, identity normaliser,
  every space kept) between special tokens, and `<mask>` appended after the pieces when the model lacks it.

  Special tokens written in the text (control pieces such as `<pad>`, `</s>`, `<eos>`, `<bos>`; the unknown
  piece; sentinels) become single ids, and are what `skip_special_tokens` drops. Defaults: T5 appends EOS,
  Gemma prepends BOS (GemmaTokenizer's own defaults); `from_dir` follows tokenizer_config.json instead.
  `special_tokens` adds tokens the tokenizer files declare special (Gemma 3's `<start_of_image>`, ...): each is
  a piece of the model or, past the pieces, has its id in `added_tokens`; `named_tokens` maps their names in the
  files (`boi_token`, `image_token`, ...) to their text.
  Known differences from transformers, none met with released vocabularies: user-defined pieces are not split
  out of the text in the T5 path; a T5 model with byte pieces, given their names (`<0x41>`) as text; a
  Gemma-style model whose normaliser is not the identity (transformers ignores it).
  """

  def __init__(self, model_file: str | None = None, *, family: str = "t5", extra_ids: int | None = None,
               add_bos: bool | None = None, add_eos: bool | None = None,
               clean_up_tokenization_spaces: bool = False, model_proto: bytes | None = None,
               special_tokens: Iterable[str] = (), added_tokens: dict[str, int] | None = None,
               named_tokens: dict[str, str] | None = None):
    """From `model_file`, or from a serialized ModelProto (`model_proto`) when no file is given."""
    if family not in ("t5", "gemma"):
      raise ValueError(f"unknown tokenizer family {family!r} (expected 't5' or 'gemma')")
    if (model_file is None) == (model_proto is None):
      raise ValueError("give exactly one of model_file and model_proto")
    try:
      if model_file is None:
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
      else:
        self._sp = spm.SentencePieceProcessor(model_file=os.fspath(model_file))
    except (RuntimeError, OSError) as e:
      raise ValueError(f"cannot read SentencePiece model {model_file or 'from model_proto'}: {e}") from e
    self.family = family
    self.model_file = None if model_file is None else os.fspath(model_file)
    is_t5 = family == "t5"
    self.extra_ids = (100 if is_t5 else 0) if extra_ids is None else extra_ids
    # Family defaults: T5 appends EOS, Gemma prepends BOS (GemmaTokenizer's own defaults).
    self.add_bos = (not is_t5) if add_bos is None else add_bos
    self.add_eos = is_t5 if add_eos is None else add_eos
    self.clean_up_tokenization_spaces = clean_up_tokenization_spaces and is_t5  # HF skips it for BPE
    sp, n = self._sp, self._sp.get_piece_size()
    self._num_pieces = n

    # content -> id for everything recognised in text; all of them are dropped by skip_special_tokens.
    self._specials = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
    for k in range(self.extra_ids):
      self._specials[f"<extra_id_{k}>"] = n + self.extra_ids - 1 - k
    for token in special_tokens:
      i = sp.piece_to_id(token) if self._is_piece(token) else (added_tokens or {}).get(token)
      if i is not None:  # a token the files name but do not place gets no id (transformers would append one)
        self._specials.setdefault(token, i)
    if not is_t5 and "<mask>" not in self._specials:
      # GemmaTokenizer always declares `<mask>`; absent from the model, it is appended as a new id.
      self._specials["<mask>"] = (sp.piece_to_id("<mask>") if self._is_piece("<mask>")
                                  else max([n - 1, *self._specials.values()]) + 1)
    self.named_tokens = dict(named_tokens or {})
    self._id_to_special = {i: s for s, i in self._specials.items()}
    self._split = _splitter(self._specials)
    if (self.add_bos and self.bos_id is None) or (self.add_eos and self.eos_id is None):
      raise ValueError(f"{model_file or 'model_proto'} has no BOS/EOS piece to add")
    if is_t5:
      # HF applies only the model's character map, then runs the unigram model on each "▁word":
      # a charmap-only normaliser, and the same model with its normaliser switched off.
      proto = sp.serialized_model_proto()
      self._normalizer = spm.SentencePieceNormalizer(
          model_proto=proto, add_dummy_prefix=False, escape_whitespaces=False, remove_extra_whitespaces=False)
      self._raw_sp = spm.SentencePieceProcessor(model_proto=proto + _IDENTITY_NORMALIZER)
      self._byte_ids = {i for i in range(n) if sp.is_byte(i)}

  def _is_piece(self, piece: str) -> bool:
    i = self._sp.piece_to_id(piece)
    return self._sp.id_to_piece(i) == piece

  def _special_id(self, piece: str, fallback: int) -> int | None:
    return self._sp.piece_to_id(piece) if self._is_piece(piece) else (fallback if fallback >= 0 else None)

  # --- ids of the special tokens ------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    """SentencePiece pieces plus sentinels (the size the model's embedding must at least have)."""
    return self._num_pieces + self.extra_ids

  @property
  def pad_id(self) -> int | None:
    return self._special_id("<pad>", self._sp.pad_id())

  @property
  def eos_id(self) -> int | None:
    return self._special_id("</s>" if self.family == "t5" else "<eos>", self._sp.eos_id())

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int | None:
    """None for T5 (it has no BOS); Gemma's `<bos>`."""
    return None if self.family == "t5" else self._special_id("<bos>", self._sp.bos_id())

  def token_id(self, token: str) -> int | None:
    """Id of `token` when it is a single token here (a special token or a piece of the model), else None."""
    if token in self._specials:
      return self._specials[token]
    return self._sp.piece_to_id(token) if self._is_piece(token) else None

  def sentinel_id(self, n: int) -> int:
    """Id of `<extra_id_n>`; sentinels count down from `sentinel_id(0)` as T5 span corruption expects."""
    if not 0 <= n < self.extra_ids:
      raise ValueError(f"sentinel {n} out of range: this tokenizer has {self.extra_ids} extra ids")
    return self._num_pieces + self.extra_ids - 1 - n

  # --- encoding -----------------------------------------------------------------------------------------
  def encode(self, text: str) -> list[int]:
    """Ids of `text`: BOS/EOS as configured, special tokens in the text as single ids."""
    ids = [self.bos_id] if self.add_bos else []
    for k, chunk in enumerate(self._split.split(text)):
      if k % 2:  # odd chunks are the captured special tokens
        ids.append(self._specials[chunk])
      elif chunk:
        ids.extend(self._encode_plain(chunk))
    if self.add_eos:
      ids.append(self.eos_id)
    return ids

  def _encode_plain(self, text: str) -> list[int]:
    if self.family == "gemma":
      return self._sp.encode(text)
    words = []
    for word in _WHITESPACE.split(self._normalizer.normalize(text)):
      if not word:
        continue
      # HF Metaspace: prepend "▁" unless present, then split before every "▁".
      word = word if word.startswith(_META) else _META + word
      words.extend(_META + w for w in word.split(_META)[1:])
    ids = [i for word_ids in self._raw_sp.encode(words) for i in word_ids]
    if not self._byte_ids:
      return ids
    # HF's T5Tokenizer never falls back to bytes: a run of unknown characters is one <unk>.
    return [self.unk_id if i in self._byte_ids else i
            for k, i in enumerate(ids) if not (k and i in self._byte_ids and ids[k - 1] in self._byte_ids)]

  # --- decoding -----------------------------------------------------------------------------------------
  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids` as transformers decodes it; ids outside the vocabulary are dropped, as HF does."""
    tokens = []
    for i in map(int, ids):
      if i in self._id_to_special:
        if not skip_special_tokens:
          tokens.append(self._id_to_special[i])
      elif 0 <= i < self._num_pieces:
        tokens.append(self._sp.id_to_piece(i))
    if self.family == "gemma":
      return _fuse_byte_pieces(t.replace(_META, " ") for t in tokens)
    # HF's Metaspace decoder drops every "▁" of the first token and turns the others into spaces.
    text = "".join([tokens[0].replace(_META, "")] + [t.replace(_META, " ") for t in tokens[1:]]) if tokens else ""
    return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

  # --- construction from a model directory --------------------------------------------------------------
  @classmethod
  def from_dir(cls, model_dir: str, family: str) -> "SentencePieceTokenizer":
    """The tokenizer in `model_dir` (`spiece.model` for T5, `tokenizer.model` for Gemma), configured by
    `tokenizer_config.json` when present: `add_bos_token`/`add_eos_token` (Gemma only; without them
    GemmaTokenizer adds what tokenizer.json's post-processor adds, or nothing without one), `extra_ids`,
    `clean_up_tokenization_spaces`; for Gemma also the special tokens the files declare (see
    `_declared_special_tokens`)."""
    name = "spiece.model" if family == "t5" else "tokenizer.model"
    cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    kwargs = {"clean_up_tokenization_spaces": bool(cfg.get("clean_up_tokenization_spaces", False))}
    if family == "t5":
      kwargs["extra_ids"] = int(cfg.get("extra_ids", 100))
    else:
      if "add_bos_token" in cfg or "add_eos_token" in cfg:
        kwargs.update(add_bos=bool(cfg.get("add_bos_token", False)), add_eos=bool(cfg.get("add_eos_token", False)))
      else:  # transformers keeps the BOS/EOS template of tokenizer.json then
        kwargs.update(zip(("add_bos", "add_eos"), _template_bos_eos(model_dir)))
      kwargs.update(_declared_special_tokens(model_dir, cfg))
    return cls(os.path.join(model_dir, name), family=family, **kwargs)

  @classmethod
  def from_tokenizer_json(cls, model_dir: str) -> "SentencePieceTokenizer":
    """The T5 tokenizer transformers' `T5Tokenizer.from_pretrained(model_dir)` builds from `tokenizer.json`
    when there is no `spiece.model`. Raises `UnsupportedTokenizerJson` saying why for a file it would not
    reproduce exactly."""
    cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    try:
      proto, extra_ids = _t5_proto_from_tokenizer_json(model_dir, cfg)
    except UnsupportedTokenizerJson:
      raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
      path = os.path.join(model_dir, "tokenizer.json")
      raise ValueError(f"{path}: not a tokenizer.json this can read ({type(e).__name__}: {e})") from None
    return cls(model_proto=proto, family="t5", extra_ids=extra_ids,
               clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)))


class UnsupportedTokenizerJson(ValueError):
  """A tokenizer.json whose tokenizer the rebuilt SentencePiece model would not reproduce exactly."""


# The tokenizer_config.json classes (or none) for which transformers builds `T5Tokenizer`, whose pipeline the
# T5 path of SentencePieceTokenizer follows: it keeps only the Unigram vocabulary and the charmap of the file.
_T5_TOKENIZER_CLASSES = (None, "T5Tokenizer", "T5TokenizerFast")
_T5_TOKENIZER_MODEL_TYPES = ("t5", "mt5")  # those AutoTokenizer maps to T5Tokenizer when no class is named
_T5_NAMED = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}  # T5Tokenizer's defaults
_T5_UNK_ID = 2  # T5Tokenizer's Unigram(unk_id=2), whatever the file says


def _t5_proto_from_tokenizer_json(model_dir: str, cfg: dict) -> tuple[bytes, int]:
  """(serialized SentencePiece ModelProto, extra_ids) equal to the T5Tokenizer that transformers builds from
  `model_dir/tokenizer.json` and the tokenizer config `cfg`.

  T5Tokenizer reads only the file's Unigram vocabulary (pieces and scores, `<extra_id_N>` sentinels last,
  counting down) and the charmap of its first `Precompiled` normaliser; unknown id 2, no byte fallback,
  whitespace split and Metaspace are fixed. So the model here holds those pieces (special tokens as control
  pieces, every other piece normal) and that charmap; anything else that would change transformers' ids (a
  non-special added token, a special token outside the vocabulary, other sentinels) raises
  UnsupportedTokenizerJson.
  """
  tokenizer_class = cfg.get("tokenizer_class")
  if tokenizer_class not in _T5_TOKENIZER_CLASSES:
    raise UnsupportedTokenizerJson(f"tokenizer_config.json names {tokenizer_class!r}, not T5Tokenizer")
  model_type = _model_type(model_dir)
  if tokenizer_class is None and model_type not in _T5_TOKENIZER_MODEL_TYPES:
    # AutoTokenizer then picks by model_type; for umt5 it reads the file's own pipeline (TokenizersBackend).
    raise UnsupportedTokenizerJson(f"no tokenizer_class names T5Tokenizer, which transformers picks itself only "
                                   f"for model_type {' or '.join(_T5_TOKENIZER_MODEL_TYPES)}, not {model_type!r}")
  data = _read_json(os.path.join(model_dir, "tokenizer.json"))
  model = data.get("model") or {}
  if model.get("type") != "Unigram" or not isinstance(model.get("vocab"), list):
    raise UnsupportedTokenizerJson(f"it holds a {model.get('type')} model, not a Unigram vocabulary")
  vocab = [(str(piece), float(score)) for piece, score in model["vocab"]]
  extra_ids = 0
  while extra_ids < len(vocab) and vocab[-1 - extra_ids][0] == f"<extra_id_{extra_ids}>":
    extra_ids += 1
  if extra_ids != int(cfg.get("extra_ids", 100)):
    raise UnsupportedTokenizerJson(f"its vocabulary ends in {extra_ids} sentinels, but T5Tokenizer expects "
                                   f"extra_ids={cfg.get('extra_ids', 100)}")
  pieces = vocab[:len(vocab) - extra_ids]
  control = _t5_special_pieces(data, cfg, vocab, len(pieces))
  if len(pieces) <= _T5_UNK_ID or pieces[_T5_UNK_ID][0] != _token_text(cfg.get("unk_token", "<unk>")):
    raise UnsupportedTokenizerJson(f"id {_T5_UNK_ID} (T5Tokenizer's unknown id) is not its unk_token")

  proto = spm_pb2.ModelProto()
  types = spm_pb2.ModelProto.SentencePiece.Type
  for i, (piece, score) in enumerate(pieces):
    kind = types.UNKNOWN if i == _T5_UNK_ID else types.CONTROL if i in control else types.NORMAL
    proto.pieces.add(piece=piece, score=score, type=kind)
  ids = {piece: i for i, (piece, _) in enumerate(pieces)}
  spec = proto.trainer_spec
  spec.model_type = spm_pb2.TrainerSpec.UNIGRAM
  spec.unk_id, spec.bos_id = _T5_UNK_ID, -1
  spec.eos_id, spec.pad_id = ids.get("</s>", -1), ids.get("<pad>", -1)
  charsmap = _precompiled_charsmap(data.get("normalizer"))
  proto.normalizer_spec.name = "user_defined" if charsmap else "identity"
  proto.normalizer_spec.precompiled_charsmap = charsmap
  return proto.SerializeToString(), extra_ids


def _t5_special_pieces(data: dict, cfg: dict, vocab: list, num_pieces: int) -> set[int]:
  """Ids below `num_pieces` of the tokens T5Tokenizer treats as special (matched whole in text, dropped by
  skip_special_tokens): its named and extra special tokens and the added tokens, each of which must be special
  and a piece of `vocab` (else transformers would give it an id of its own)."""
  added = [(t.get("content"), t.get("id"), t.get("special")) for t in data.get("added_tokens") or []]
  added += [(t.get("content"), int(i), t.get("special")) for i, t in (cfg.get("added_tokens_decoder") or {}).items()]
  for content, i, special in added:
    if not special:
      raise UnsupportedTokenizerJson(f"added token {content!r} is not special")
    if not (isinstance(i, int) and 0 <= i < len(vocab) and vocab[i][0] == content):
      raise UnsupportedTokenizerJson(f"added token {content!r} has id {i}, which is not its vocabulary piece")
  ids = {piece: i for i, (piece, _) in enumerate(vocab)}
  named = [cfg.get(key, default) for key, default in _T5_NAMED.items()]
  extra = cfg.get("extra_special_tokens", cfg.get("additional_special_tokens")) or []
  special = {i for _, i, _ in added}
  for content in map(_token_text, named + list(extra.values() if isinstance(extra, dict) else extra)):
    if content not in ids:
      raise UnsupportedTokenizerJson(f"special token {content!r} is not in its vocabulary")
    special.add(ids[content])
  return {i for i in special if i < num_pieces}


def _template_bos_eos(model_dir: str) -> tuple[bool, bool]:
  """Whether the TemplateProcessing post-processor of `model_dir/tokenizer.json` puts `<bos>` before and `<eos>`
  after a single text (False, False without one)."""
  post = _read_json(os.path.join(model_dir, "tokenizer.json")).get("post_processor") or {}
  for step in post.get("processors", []) if post.get("type") == "Sequence" else [post]:
    if step.get("type") == "TemplateProcessing":
      items = [("A", None) if "Sequence" in item else ("S", item.get("SpecialToken", {}).get("id"))
               for item in step.get("single") or []]
      a = [kind for kind, _ in items].index("A") if ("A", None) in items else len(items)
      return ("S", "<bos>") in items[:a], ("S", "<eos>") in items[a + 1:]
  return False, False


def _declared_special_tokens(model_dir: str, cfg: dict) -> dict:
  """`special_tokens`, `added_tokens` and `named_tokens` of SentencePieceTokenizer as a Gemma directory's files
  declare them, read the way transformers 5 reads them: named `*_token` keys of tokenizer_config.json (and of its
  `model_specific_special_tokens` / `extra_special_tokens` dicts; special_tokens_map.json fills gaps), the entries
  of an `extra_special_tokens` list, and the added tokens marked special in `added_tokens_decoder` and
  tokenizer.json, whose ids also place tokens past the SentencePiece pieces (Gemma 3's `<image_soft_token>`)."""
  smap = _read_json(os.path.join(model_dir, "special_tokens_map.json"))
  data = _read_json(os.path.join(model_dir, "tokenizer.json"))
  named = {}
  extra = cfg.get("extra_special_tokens", cfg.get("additional_special_tokens"))
  for source in (cfg, cfg.get("model_specific_special_tokens"), extra, smap):
    for key, value in (source.items() if isinstance(source, dict) else ()):
      if key.endswith("_token") and isinstance(value, (str, dict)) and _token_text(value):
        named.setdefault(key, _token_text(value))
  lists = (extra, smap.get("extra_special_tokens"), smap.get("additional_special_tokens"))
  special = list(named.values()) + [_token_text(t) for tokens in lists if isinstance(tokens, list) for t in tokens]
  added = [(t.get("content"), int(i), t.get("special")) for i, t in (cfg.get("added_tokens_decoder") or {}).items()]
  added += [(t.get("content"), t.get("id"), t.get("special")) for t in data.get("added_tokens") or []]
  special += [content for content, _, is_special in added if is_special]
  return {"special_tokens": special, "added_tokens": {content: i for content, i, _ in added},
          "named_tokens": named}


def _token_text(token) -> str:
  """A token as tokenizer_config.json writes it: a string, or a serialized AddedToken dict."""
  return token.get("content", "") if isinstance(token, dict) else str(token)


def _precompiled_charsmap(normalizer: dict | None) -> bytes:
  """The charmap transformers passes to T5Tokenizer: that of the first `Precompiled` normaliser, if any."""
  if not normalizer:
    return b""
  steps = normalizer["normalizers"] if normalizer.get("type") == "Sequence" else [normalizer]
  for step in steps:
    if step.get("type") == "Precompiled" and "precompiled_charsmap" in step:
      return base64.b64decode(step["precompiled_charsmap"] or "")
  return b""


def _fuse_byte_pieces(tokens: Iterable[str]) -> str:
  """HF's ByteFallback + Fuse decoders: runs of `<0xAB>` pieces become their utf-8 text, or one U+FFFD per
  byte when the run is not valid utf-8."""
  out, run = [], bytearray()
  for token in list(tokens) + [None]:
    m = _BYTE_PIECE.fullmatch(token) if token is not None else None
    if m:
      run.append(int(m.group(1), 16))
      continue
    if run:
      try:
        out.append(run.decode("utf-8"))
      except UnicodeDecodeError:
        out.append("\ufffd" * len(run))
      run = bytearray()
    if token is not None:
      out.append(token)
  return "".join(out)


class ByteTokenizer(_Tokenizer):
  """ByT5's tokenizer: id = utf-8 byte + 3 after `<pad>`=0, `</s>`=1, `<unk>`=2, matching transformers'
  `ByT5Tokenizer`. As there, `<extra_id_N>` in text maps to 259 + N (counting up), whitespace next to
  `<pad>`, `</s>`, `<unk>` in the text is stripped, and EOS is appended unless the ids already end with it.
  Decoding drops bytes that do not form utf-8, and ids outside the vocabulary (where HF raises)."""

  pad_id, eos_id, unk_id, bos_id = 0, 1, 2, None
  _OFFSET = 3

  def __init__(self, extra_ids: int = 125, add_eos: bool = True):
    self.extra_ids = extra_ids
    self.add_eos = add_eos
    self._specials = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    self._specials.update({f"<extra_id_{k}>": 259 + k for k in range(extra_ids)})
    self._id_to_special = {i: s for s, i in self._specials.items()}
    self._split = _splitter(self._specials)

  @property
  def vocab_size(self) -> int:
    return 256 + self._OFFSET + self.extra_ids

  def sentinel_id(self, n: int) -> int:
    """ByT5 pretraining's n-th sentinel: it reuses the last byte ids (258, 257, ...) as seqio's
    `ByteVocabulary` does; this is not the id transformers gives the text `<extra_id_n>`."""
    if not 0 <= n < 256:
      raise ValueError(f"sentinel {n} out of range for a byte vocabulary")
    return 256 + self._OFFSET - 1 - n

  def encode(self, text: str) -> list[int]:
    """Ids of `text` as `ByT5Tokenizer().encode(text)` gives them."""
    chunks = self._split.split(text)
    for k in range(1, len(chunks), 2):  # the same stripping order as PreTrainedTokenizer.tokenize
      if self._specials[chunks[k]] < self._OFFSET:
        if chunks[k + 1]:
          chunks[k + 1] = chunks[k + 1].lstrip()
        if chunks[k - 1]:
          chunks[k - 1] = chunks[k - 1].rstrip()
    ids = []
    for k, chunk in enumerate(chunks):
      ids.extend([self._specials[chunk]] if k % 2 else [b + self._OFFSET for b in chunk.encode("utf-8")])
    if self.add_eos and not (ids and ids[-1] == self.eos_id):
      ids.append(self.eos_id)
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    out = bytearray()
    for i in map(int, ids):
      if i in self._id_to_special:
        if not skip_special_tokens:
          out += self._id_to_special[i].encode("utf-8")
      elif self._OFFSET <= i < 256 + self._OFFSET:
        out.append(i - self._OFFSET)
    return out.decode("utf-8", errors="ignore")


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None


def _model_type(model_dir: str) -> str | None:
  """model_type of the config.json in `model_dir`: transformers' own, or the one inside ours."""
  cfg = _read_json(os.path.join(model_dir, "config.json"))
  return cfg.get("model_type") or (cfg.get("config") or {}).get("model_type")


def _is_byt5_dir(model_dir: str) -> bool:
  for name in ("config.json", "tokenizer_config.json"):
    if _read_json(os.path.join(model_dir, name)).get("tokenizer_class") == "ByT5Tokenizer":
      return True
  return False


def load_tokenizer(model_dir: str, family: str) -> SentencePieceTokenizer | ByteTokenizer | None:
  """The tokenizer shipped in `model_dir`, or None. `family` is the tokenizer's flavour, as a model family's
  registry entry names it (`Family.tokenizer`): "t5" reads `spiece.model` (or is ByT5), else rebuilds one from a
  transformers-5 `tokenizer.json`; "gemma" reads `tokenizer.model`.

  A file that SentencePiece cannot read raises ValueError naming it. A `tokenizer.json` that cannot be read
  exactly (any for Gemma: its BPE needs the `tokenizers` package) gives None with a warning naming the
  directory and the file to add, so that `model.tokenizer` is not None without a word.
  """
  model_dir = os.fspath(model_dir)
  has_json = os.path.isfile(os.path.join(model_dir, "tokenizer.json"))
  if family == "t5":
    if os.path.isfile(os.path.join(model_dir, "spiece.model")):
      return SentencePieceTokenizer.from_dir(model_dir, "t5")
    if _is_byt5_dir(model_dir):
      cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
      return ByteTokenizer(extra_ids=int(cfg.get("extra_ids", 125)))
    if not has_json:
      return None
    try:
      return SentencePieceTokenizer.from_tokenizer_json(model_dir)
    except UnsupportedTokenizerJson as e:
      _warn_no_tokenizer(model_dir, "spiece.model", f"cannot be rebuilt exactly: {e}")
      return None
  if os.path.isfile(os.path.join(model_dir, "tokenizer.model")):
    return SentencePieceTokenizer.from_dir(model_dir, "gemma")
  if has_json:
    _warn_no_tokenizer(model_dir, "tokenizer.model", "is read exactly only by the `tokenizers` package, which "
                       "t5x_lite does not depend on")
  return None


def _warn_no_tokenizer(model_dir: str, wanted: str, why: str) -> None:
  # stacklevel 3: the line that called load_tokenizer.
  warnings.warn(f"{model_dir}: no {wanted}, and its tokenizer.json {why}; the tokenizer is None. Copy {wanted} "
                "from the original checkpoint into this directory.", stacklevel=3)
