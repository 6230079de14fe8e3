"""The training input pipeline: documents -> token ids -> objective -> packed fixed-length batches, on grain.

    documents -> shuffle(seed) -> repeat(epochs) -> map_with_index(tokenize, objective: a list of examples)
      -> lane j = every batch_size-th document from j -> flatten -> pack into rows     (one lane per batch row)
      -> zip the lanes of this host -> model features (packing.py)

What grain gives us (grain.MapDataset / IterDataset, no DataLoader workers):
- `MapDataset.shuffle(seed).repeat(n)`: a global, index-addressable shuffle, different every epoch;
- `map_with_index`: the stream index of each document, so all randomness of an example comes from
  (seed, document index) and is the same after a restore, on any host;
- `ds[j::B]` slicing (grain's sharding idiom) for the lanes, `FlatMapIterDataset` (one document -> its examples),
  `FirstFitPackIterDataset` (packing, see packing.py), `ZipIterDataset` (one row from each lane);
- checkpointable iterators: `get_state()` is a small JSON-serialisable dict (stream indices, the packer's open
  rows as the state to replay from), `set_state()` resumes exactly where the saved iterator was. grain's own
  orbax handler (`grain.checkpoint.CheckpointHandler`) can save it too, but a JSON dict in the training
  checkpoint is all that is needed.

Lanes and hosts: the global batch of `batch_size` rows is built from `batch_size` independent lanes; lane j packs
documents j, j+B, j+2B, ... of the shuffled stream into its rows, and row j of every batch comes from lane j.
Host i of n owns lanes [i B/n, (i+1) B/n) and tokenizes and corrupts only their documents (every host holds the
document list: lanes draw from the whole shuffled stream). So the global batch is the same for any number of
hosts (host 0's rows, then host 1's, ... equal the single-host batch), which lets a multi-process run reproduce
a single-process run with the same global batch, while the hosts process disjoint shares.
With finite epochs a host's stream ends when its first lane runs dry (the other lanes' last rows are dropped),
so hosts may stop at different steps: train by steps on the default endless stream (num_epochs=None).

Note: grain's index shuffle is slow on tiny corpora (about 30 ms / corpus size per document: 3 ms for 10
documents, 0.03 ms for 1000); it does not matter for real corpora. `shuffle=False` skips it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import grain
import numpy as np
from grain import experimental as grain_experimental

from t5x_lite.config.fields import check_field_types
from t5x_lite.data import packing, sources
from t5x_lite.data.ul2 import Denoiser, Mixture, ul2_denoisers, ul2_examples

OBJECTIVES = ("ul2", "span_corruption", "seq2seq", "lm")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the pipeline makes. Lengths include EOS (and UL2's mode tokens).

  objective: "ul2" (the seven-task mixture, ul2.py), "span_corruption" (T5's objective at `noise_density` /
    `mean_noise_span_length`), "seq2seq" (supervised: JSONL records {"inputs", "targets"}), "lm" (decoder-only
    language modelling: each document + EOS cut into pieces of `length` tokens, loss on all of them).
  decoder_only: False: encoder-decoder batches within `inputs_length` / `targets_length`; True: one sequence
    of `length` tokens per row (inputs + targets concatenated, loss on the targets; packing.py). The defaults
    512 / 114 are T5's span-corruption budget; UL2's X and S tasks want long targets (UL2-20B used 512 / 512).
  batch_size: rows of the *global* batch; each of `process_count` hosts gets batch_size // process_count.
  seed: the shuffle and every example's randomness. num_epochs: None repeats forever.
  ul2_rates: weights of the seven UL2 tasks (R3, R8, X3, X8, X64-.15, X64-.5, S), default uniform.
  mode_ids: token ids of [NLU], [NLG], [S2S]; default: the tokenizer's last three sentinels (<extra_id_{E-1}>,
    <extra_id_{E-2}>, <extra_id_{E-3}>), reserved for that, the others left to span corruption.
  first_sentinel_id / num_sentinels: default the tokenizer's <extra_id_0> and all free extra ids.
  start_id: the decoder start token (0, T5) or, decoder-only, what each example starts with (e.g. Gemma's BOS).
  pack: False puts one example per row. packing_bins: open rows per lane (first-fit across them).
  prefetch: batches a background thread prepares ahead (grain's ThreadPrefetchIterDataset); 0 = none. With
    prefetch, `close()` the iterator when done.
  max_images: image slots of an encoder row (images and pan-and-scan crops of the examples packed in it); 0 = text
    only. With images (a model with a vision tower and its processor, seq2seq), a record may carry
    "images": [paths] (relative to its JSONL file), one per `<start_of_image>` of its "inputs"; the batch gains
    `pixel_values` (B, max_images, 3, height, width), each row's images in the order of its image tokens.
  image_threads: threads that decode and preprocess images, per lane (grain read threads); Pillow works outside
    the GIL there.
  """
  objective: str = "ul2"
  decoder_only: bool = False
  batch_size: int = 8
  inputs_length: int = 512
  targets_length: int = 114
  length: int = 1024
  seed: int = 0
  num_epochs: int | None = None
  shuffle: bool = True
  files: tuple[str, ...] = ()
  text_key: str = "text"
  noise_density: float = 0.15
  mean_noise_span_length: float = 3.0
  ul2_rates: tuple[float, ...] | None = None
  mode_ids: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None
  first_sentinel_id: int | None = None
  num_sentinels: int | None = None
  start_id: int = 0
  pack: bool = True
  packing_bins: int = 4
  prefetch: int = 0
  max_images: int = 0
  image_threads: int = 1

  def __post_init__(self):
    check_field_types(self)
    for name in ("batch_size", "inputs_length", "targets_length", "length", "packing_bins"):
      if getattr(self, name) < 1:
        raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.objective not in OBJECTIVES:
      raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
    if self.objective == "lm" and not self.decoder_only:
      raise ValueError("objective 'lm' needs decoder_only=True")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"seed must lie in [0, 2**32) (grain's shuffle), got {self.seed}")
    if self.max_images < 0 or self.image_threads < 1:
      raise ValueError(f"DataConfig.max_images must be >= 0 and image_threads >= 1, got {self.max_images} and "
                       f"{self.image_threads}")
    if self.max_images and (self.objective != "seq2seq" or self.decoder_only):
      raise ValueError(f"DataConfig.max_images {self.max_images}: images are read by encoder-decoder seq2seq "
                       f"training only (objective {self.objective!r}, decoder_only {self.decoder_only})")


def token_ids(tokenizer, text: str) -> list[int]:
  """`tokenizer.encode(text)` without the BOS/EOS the tokenizer adds itself: the objectives place EOS."""
  return without_added_tokens(tokenizer, tokenizer.encode(text))


def without_added_tokens(tokenizer, ids) -> list[int]:
  """`ids` as the tokenizer wrote them, less the BOS / EOS it adds to every text."""
  ids = list(ids)
  if getattr(tokenizer, "add_bos", False) and ids and ids[0] == tokenizer.bos_id:
    ids = ids[1:]
  if getattr(tokenizer, "add_eos", False) and ids and ids[-1] == tokenizer.eos_id:
    ids = ids[:-1]
  return ids


def make_mixture(config: DataConfig, tokenizer) -> Mixture:
  """The denoiser mixture of a "ul2" or "span_corruption" config, with its budget and sentinels."""
  extra_ids = getattr(tokenizer, "extra_ids", 0)
  if config.objective == "ul2":
    if config.mode_ids is None:
      if extra_ids < 4:
        raise ValueError("UL2 needs mode_ids (the [NLU], [NLG], [S2S] token ids): the tokenizer has no spare "
                         "sentinels to reserve for them")
      mode_ids = tuple((tokenizer.sentinel_id(extra_ids - 1 - k),) for k in range(3))
      reserved = 3
    else:
      mode_ids, reserved = tuple(tuple(m) for m in config.mode_ids), 0
    denoisers = ul2_denoisers(*mode_ids)
  else:
    denoisers, reserved = (Denoiser((), config.noise_density, config.mean_noise_span_length, "span"),), 0
  if config.first_sentinel_id is None and extra_ids == 0:
    raise ValueError("first_sentinel_id is required: the tokenizer has no sentinels")
  first = tokenizer.sentinel_id(0) if config.first_sentinel_id is None else config.first_sentinel_id
  num = extra_ids - reserved if config.num_sentinels is None else config.num_sentinels
  sentinel_range = range(first - num + 1, first + 1)
  clash = sorted({i for d in denoisers for i in d.mode_ids if i in sentinel_range})
  if clash:
    raise ValueError(f"mode ids {clash} lie among the span sentinels {first - num + 1}..{first}")
  budget = (dict(length=config.length) if config.decoder_only
            else dict(inputs_length=config.inputs_length, targets_length=config.targets_length))
  return Mixture(denoisers, first_sentinel_id=first, num_sentinels=num, eos_id=tokenizer.eos_id,
                 rates=config.ul2_rates if config.objective == "ul2" else None, **budget)


def _with_eos(ids: Sequence[int], limit: int, eos_id: int) -> list[int]:
  """`ids` trimmed to leave room for EOS within `limit` tokens, then EOS (seqio's append_eos_after_trim)."""
  return list(ids[:max(limit - 1, 0)]) + [eos_id] if limit > 0 else []


class _DocumentExamples:
  """(stream index, document) -> the list of per-example dicts the packer takes (possibly empty)."""

  def __init__(self, config: DataConfig, tokenizer, processor=None):
    self._config, self._tokenizer, self._processor = config, tokenizer, processor
    self._eos = tokenizer.eos_id
    self._mixture = make_mixture(config, tokenizer) if config.objective in ("ul2", "span_corruption") else None
    self._to_example = packing.decoder_only_example if config.decoder_only else packing.encoder_decoder_example

  def __call__(self, index: int, doc: sources.Document) -> list[dict[str, np.ndarray]]:
    c = self._config
    if c.objective == "seq2seq" and c.max_images:
      return [self._with_images(doc)]
    if c.objective == "seq2seq":
      return [self._to_example(*self._seq2seq(doc))]
    ids = token_ids(self._tokenizer, sources.document_text(doc, c.text_key))
    if c.objective == "lm":
      if not ids:
        return []
      ids = ids + [self._eos]  # EOS marks the document's end only; pieces are cut from the stream
      return [self._to_example([], ids[k:k + c.length]) for k in range(0, len(ids), c.length)]
    # Per-example randomness from (seed, stream index): reproducible after a restore and on any host.
    return [self._to_example(ex.inputs, ex.targets)
            for ex in ul2_examples(ids, self._mixture, seed=(c.seed, index))]

  def _with_images(self, doc) -> dict[str, np.ndarray]:
    """An encoder-decoder example with `pixel_values` (n, 3, height, width): the processor expands each
    `<start_of_image>` of the inputs as transformers does, for the crops each image gives."""
    c = self._config
    inputs, targets = (doc["inputs"], doc["targets"]) if isinstance(doc, dict) else doc
    paths = doc.get("images", []) if isinstance(doc, dict) else []
    ids, pixels = self._processor.encode_example(inputs, paths)
    encoder_input, target_ids = self._seq2seq((ids, targets), inputs_are_ids=True)
    image_token = self._processor.image_token_id
    if np.count_nonzero(np.asarray(encoder_input) == image_token) != np.count_nonzero(ids == image_token):
      raise ValueError(f"an input with images {list(paths)} is {len(ids)} tokens, over DataConfig.inputs_length "
                       f"{c.inputs_length}: its image tokens cannot be cut")
    if len(pixels) > c.max_images:
      raise ValueError(f"the images {list(paths)} of one record give {len(pixels)} images and crops, over "
                       f"DataConfig.max_images {c.max_images}")
    return {**packing.encoder_decoder_example(encoder_input, target_ids), "pixel_values": pixels}

  def _seq2seq(self, doc, inputs_are_ids: bool = False) -> tuple[list[int], list[int]]:
    c = self._config
    if isinstance(doc, dict):
      inputs, targets = doc["inputs"], doc["targets"]
    else:
      inputs, targets = doc
    # The processor's ids are as the tokenizer writes them, BOS / EOS included.
    inputs = without_added_tokens(self._tokenizer, inputs) if inputs_are_ids else token_ids(self._tokenizer, inputs)
    targets = token_ids(self._tokenizer, targets)
    if not c.decoder_only:
      # The encoder reads its input as the model's tokenizer writes the text (T5: ... </s>; a Gemma-style
      # tokenizer: <bos> ... when it adds BOS, no EOS), trimmed to inputs_length, so that inference on
      # `tokenizer.encode(text)` reads what training read. The targets always end with EOS.
      tok = self._tokenizer
      bos = [tok.bos_id] if getattr(tok, "add_bos", False) else []
      if getattr(tok, "add_eos", False):
        encoder_input = bos + _with_eos(inputs, c.inputs_length - len(bos), self._eos)
      else:
        encoder_input = (bos + inputs)[:c.inputs_length]
      return encoder_input, _with_eos(targets, c.targets_length, self._eos)
    # Decoder-only: the targets keep up to length - 1 tokens, the inputs take what is left.
    targets = _with_eos(targets, c.length - 1, self._eos)
    return _with_eos(inputs, c.length - len(targets), self._eos), targets


class _Flatten(grain_experimental.FlatMapTransform):
  """A document's list of examples -> the examples, one by one."""
  max_fan_out = 1 << 20  # only read by MapDataset flat maps; ours runs on an IterDataset

  def flat_map(self, examples):
    return examples


class _Features:
  """A tuple of packed rows, one per lane -> the model features of the batch."""

  def __init__(self, decoder_only: bool, start_id: int):
    self._decoder_only, self._start_id = decoder_only, start_id

  def __call__(self, rows) -> dict[str, np.ndarray]:
    stacked = packing.stack_rows(rows)
    if self._decoder_only:
      return packing.decoder_only_features(stacked, start_id=self._start_id)
    return packing.encoder_decoder_features(stacked, start_id=self._start_id)


def _host_lanes(batch_size: int, process_index: int | None, process_count: int | None) -> range:
  if process_index is None or process_count is None:
    import jax  # only to ask which host this is
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count or not 0 <= process_index < process_count:
    raise ValueError(f"batch_size {batch_size} must split evenly over {process_count} hosts "
                     f"(process_index {process_index})")
  per_host = batch_size // process_count
  return range(process_index * per_host, (process_index + 1) * per_host)


def lanes_of_states(states: Sequence[dict]) -> list[dict]:
  """The global batch's lane states in row order, from the iterator states (`get_state()`) of hosts 0, 1, ... of a
  run: host i's state holds its own lanes in order (`_host_lanes`), so the lanes are the hosts' in turn."""
  lanes = []
  for i, state in enumerate(states):
    if not isinstance(state, dict) or not isinstance(state.get("parents"), list):
      got = f"keys {sorted(state)}" if isinstance(state, dict) else type(state).__name__
      raise ValueError(f"host {i}'s data iterator state is not one of make_batches' lane states (got {got})")
    lanes.extend(state["parents"])
  return lanes


def host_state(lanes: Sequence[dict], *, process_index: int | None = None, process_count: int | None = None) -> dict:
  """This host's iterator state (for `set_state` of `make_batches`' iterator) from the global lane states: a lane
  goes on from where it stood whichever host now holds it, so a run saved by any number of hosts resumes on any
  other with the next unseen examples (the global batch, `len(lanes)` rows, must be the same)."""
  return {"parents": [lanes[j] for j in _host_lanes(len(lanes), process_index, process_count)]}


def rebatched_lanes(lanes: Sequence[dict], batch_size: int, fresh_lane: dict) -> tuple[list[dict], int]:
  """Lane states for a global batch of `batch_size` rows from those of a run with `len(lanes)` rows, when the user
  accepts the change: lane j of B reads documents j, j+B, ... of the shuffled stream, so another B regroups the
  stream and no exact position carries over. Every new lane starts at the first document some old lane had not
  wholly packed into emitted rows (no document is skipped); documents past it that faster lanes had read are read
  again. `fresh_lane` is a lane state of a new iterator (the template). Returns (the lanes, that document's index
  in the shuffled stream)."""
  old = len(lanes)
  # A lane's source position is where its packer's current round began (packing.py): its documents before that
  # are in emitted rows; the one before it may still have examples in the round, hence n - 1.
  start = min(j + max(_source_index(lane) - 1, 0) * old for j, lane in enumerate(lanes))
  return [_with_source_index(fresh_lane, -(-max(start - j, 0) // batch_size)) for j in range(batch_size)], start


def _source_index(lane: dict) -> int:
  """The next document index (within its lane) of a lane state: the innermost `next_index` of its parents."""
  while "parent" in lane:
    lane = lane["parent"]
  if "next_index" not in lane:
    raise ValueError(f"a lane state without a source position ({sorted(lane)}): not one of make_batches' states")
  return int(lane["next_index"])


def _with_source_index(lane: dict, index: int) -> dict:
  if "parent" in lane:
    return {**lane, "parent": _with_source_index(lane["parent"], index)}
  return {**lane, "next_index": index}


def check_documents(docs: Sequence[sources.Document], config: DataConfig, processor=None) -> None:
  """ValueError naming the first document the objective cannot read (its file:line when `docs` came from
  `sources.read_documents`), before training starts rather than when the shuffled stream reaches it: its fields,
  and with images their count against the `<start_of_image>` of its inputs and that each file exists."""
  for i, doc in enumerate(docs):
    problem = _document_problem(doc, config) or _images_problem(doc, config, processor)
    if problem:
      where = docs.origin(i) if isinstance(docs, sources.Documents) else f"document {i}"
      raise ValueError(f"{where}: {problem}")


def _images_problem(doc, config: DataConfig, processor) -> str:
  if not isinstance(doc, dict) or "images" not in doc:
    return ""
  images = doc["images"]
  if not config.max_images:
    return ('"images" given, but DataConfig.max_images is 0 (text only): set it to the most images and crops a '
            "packed row may hold")
  if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
    return f'"images" must be a list of file paths, got {images!r}'
  boi = processor.tokens.boi
  if doc["inputs"].count(boi) != len(images):
    return f'"inputs" holds {doc["inputs"].count(boi)} {boi} but "images" lists {len(images)} files'
  for path in images:
    if not os.path.isfile(path):
      return f"image file {path} does not exist" if not os.path.exists(path) else f"image {path} is not a file"
  return ""


def _document_problem(doc, config: DataConfig) -> str:
  if config.objective == "seq2seq":
    if isinstance(doc, dict):
      for key in ("inputs", "targets"):
        if key not in doc:
          return f'no "{key}" field (seq2seq records need "inputs" and "targets"; it has {sorted(doc)})'
        if not isinstance(doc[key], str):
          return f'"{key}" must be a string, got {type(doc[key]).__name__}'
      return ""
    if isinstance(doc, (list, tuple)) and len(doc) == 2 and all(isinstance(x, str) for x in doc):
      return ""
    return f'a seq2seq document is a record {{"inputs": ..., "targets": ...}}, got {type(doc).__name__}'
  if isinstance(doc, str):
    return ""
  if isinstance(doc, dict):
    if not isinstance(doc.get(config.text_key), str):
      return (f'no string "{config.text_key}" field (DataConfig.text_key) in this record; it has {sorted(doc)}'
              if config.text_key not in doc else f'"{config.text_key}" must be a string')
    return ""
  return f"a document is a string or a record, got {type(doc).__name__}"


def make_dataset(config: DataConfig, tokenizer, *, documents: Sequence[sources.Document] | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 processor=None) -> grain.IterDataset:
  """This host's batches as a grain IterDataset (see `make_batches`)."""
  if config.max_images and getattr(processor, "image_processor", None) is None:
    raise ValueError(f"DataConfig.max_images is {config.max_images}, but no image processor was given: images need a "
                     "model with a vision tower and its processor files (preprocessor_config.json) beside the "
                     "tokenizer")
  if documents is None:
    docs = sources.read_documents(config.files)
  else:  # Documents keep their file:line origins for check_documents; anything else (a generator) becomes a list
    docs = documents if isinstance(documents, sources.Documents) else list(documents)
  if not docs:
    raise ValueError("no documents: give `documents` or `config.files`")
  check_documents(docs, config, processor)
  docs = list(docs)
  lanes = _host_lanes(config.batch_size, process_index, process_count)
  ds = grain.MapDataset.source(docs)
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat(config.num_epochs).map_with_index(_DocumentExamples(config, tokenizer, processor))
  if config.decoder_only:
    lengths = {"tokens": config.length, "is_target": config.length}
  else:
    lengths = {"inputs": config.inputs_length, "targets": config.targets_length}
  if config.max_images:
    lengths["pixel_values"] = config.max_images  # the packer fills a row's image slots as it fills its tokens
  # Text lanes read in the calling thread (num_threads=0): the documents are in memory, and threads would only
  # contend for the GIL. `prefetch` overlaps the whole pipeline with training instead. Images are decoded and
  # resized by Pillow, which releases the GIL: each lane reads them in its own threads.
  threads = config.image_threads if config.max_images else 0
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
  rows = []
  for j in lanes:
    examples = grain_experimental.FlatMapIterDataset(ds[j::config.batch_size].to_iter_dataset(read), _Flatten())
    rows.append(packing.pack_dataset(examples, lengths=lengths, num_bins=config.packing_bins, pack=config.pack))
  batches = grain_experimental.ZipIterDataset(rows, strict=False).map(_Features(config.decoder_only, config.start_id))
  if config.prefetch:
    batches = grain_experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=config.prefetch)
  return batches


def make_batches(config: DataConfig, tokenizer, *, documents: Sequence[sources.Document] | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 processor=None) -> grain.DatasetIterator:
  """An iterator over this host's batches: dicts of numpy arrays (batch_size // process_count, L), the
  features of packing.py.

  `documents` (strings, or dicts for JSONL-style records) replaces `config.files`, e.g. a corpus built at run
  time. `tokenizer` needs `encode(text)` and `eos_id` (plus `sentinel_id(n)`/`extra_ids` unless the config
  names the sentinels). Hosts default to `jax.process_index()` / `jax.process_count()`. `processor`
  (t5x_lite.vision.Processor) reads the images of a config with `max_images`.

  The iterator's `get_state()` is a JSON-serialisable dict; `set_state(state)` on an iterator made from the same
  config and documents continues with exactly the batches the saved iterator would have produced next.
  """
  return iter(make_dataset(config, tokenizer, documents=documents, process_index=process_index,
                           process_count=process_count, processor=processor))
