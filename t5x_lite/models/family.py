"""What a model family provides. Every family fills one `Family` record (registry.py); the rest of the package
dispatches on these hooks or on the config's architecture (`config.is_encoder_decoder`), never on a family's name.

A family's config class carries `family` (its registry name), `is_encoder_decoder`, `task`, `vocab_size`, the
token ids (`pad_token_id`, `eos_token_id`, and `decoder_start_token_id` for encoder-decoders), `dtype`,
`param_dtype`, `replace(**changes)` and `canonical()` (the same model in the one form configs are compared in).
Its hooks (shape letters: t5x_lite/shapes.py):

  param_specs(config) -> tree of ParamSpec: every parameter's shape, logical axes and initialiser.
  forward(params, config, input_ids_BS, attention_mask_BS[, decoder_input_ids_BT, decoder_attention_mask_BT],
          *, rng=None) -> the task's float32 output: logits (B, T, V) for "lm" (decoder positions for an
          encoder-decoder), (B, labels) for "seq_cls", (B, S, labels) for "token_cls" ...; the decoder arguments
          exactly when the config is an encoder-decoder.
  encode(params, config, input_ids_BS, attention_mask_BS) -> (B, S, D) final encoder states; None for a
          decoder-only family.
  decoder(params, config, input_ids_BP, attention_mask_BP, beams, max_new) -> Decoder for the decoding loops
          (decoding/), over R = B x beams rows.
  batch_logits(params, config, batch, rng) -> (B, T, V) logits of a packed training batch (the features of
          data/packing.py for the config's architecture); the loss reads targets and weights from the batch.
  forward_flops_per_token(config) -> {segment-id feature of a training batch: forward FLOPs per real token}
          (2 x the parameters a token passes through; attention scores are left out).
  activation_stacks(config, lengths) -> tuple of layers.Stack: the stacks of identical layers a training batch runs,
          with their positions per row and their attentions' key positions, for memory estimates
          (training/memory.py); `lengths` maps the batch's segment-id features (forward_flops_per_token's keys) to
          their lengths, and "images" to the image slots per row.
  check_inputs(config, input_ids_BS, decoder_input_ids_BT or None) -> None, or ValueError for inputs the task
          cannot read.
  slot_decoder(config, slots, input_length, ring) -> SlotDecoder: the decoder over a fixed number of slots, each
          holding one request, for in-flight batching (decoding/slots.py); `ring` (decoding/kv_cache.Ring) sizes
          its self-attention caches.
  image_rows(config, input_ids_BS, pixel_values_I3HW) -> (B, I, c, height, width): only for a family whose
          encoder reads images. It lays transformers' flat pixel_values out per row (ValueError when the image
          tokens and the images disagree); forward, encode, decoder and batch_logits (batch["pixel_values"])
          then take them as the keyword `pixel_values_BI3HW`.

And data: its transformers `model_types`, `config_from_hf` / `config_to_hf`, the module of its converter
layout (`layout_module`, imported by convert/, which models/ knows nothing of) and the flavour of its
SentencePiece tokenizer files (`tokenizer`: "t5" reads spiece.model, "gemma" tokenizer.model).
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax


class Decoder(NamedTuple):
  """A family's incremental decoder over R rows (B x beams), as decoding/'s loops take it.

  step(tokens_R, state, t) -> (logits_RV, state): feeds the token chosen at step t - 1 (or `first_tokens_R`)
    and returns the next logits; with `vocab_major`, step(..., vocab_major=True) may return them as (V, R).
  reorder(state, rows_R) -> state: the state of the given rows (beam search).
  Exactly one of `first_tokens_R` (fed at step 0: an encoder-decoder's start token) and `first_logits_RV` (a
  decoder-only prefill's last logits, which give the first choice) is set.
  """
  step: Callable
  state: Any
  first_tokens_R: jax.Array | None
  first_logits_RV: jax.Array | None
  reorder: Callable
  vocab_major: bool = False


class SlotDecoder(NamedTuple):
  """A family's decoder over R slots that requests enter and leave one by one (in-flight batching).

  Every slot's self-attention cache is a ring indexed by one clock `g` (scalar int32) that all slots share: step g
  writes slot g % n of each ring of n slots (one per span, kv_cache.Ring) in every row, and a request admitted at
  clock g0 keeps its prompt (decoder-only) in the slots of clock values [g0 - P, g0). Per-row validity masks keep
  each row to its own request's keys, so the step stays one program with one scalar write position, whatever mix
  of requests the slots hold.

  prepare(params) -> weights: what encode, place and step read (decoding weight layouts computed once).
  init() -> cache: R idle slots (every row attends at least to its current key, so idle rows stay finite).
  encode(weights, ids_AP, mask_AP, extra) -> (staged, first_logits_AV or None): runs the encoder (or the prefill)
    of A requests (right-padded ids for encoder-decoders, left-padded for decoder-only) before they have slots:
    `staged` is their state, every leaf (A, ...) with its sequence axis padded to the slots' input length (so
    that any of them can be taken out later); decoder-only families also return the logits of each request's
    first new token. `extra`: the encoder's keyword inputs (images) per request.
  place(cache, rows_A, staged_A, g) -> cache: writes A staged requests (taken from `encode`'s) into slot rows
    `rows_A` at clock g (rows >= R are padding and dropped).
  step(weights, tokens_R, cache, g, span) -> (logits_RV, cache): feeds each row's token at clock g, reading only
    the ring of `span` slots, the last `span` clock values (static, one of ring.spans; the caller keeps every
    row's keys inside them).
  start_token: the token an encoder-decoder's first step feeds (None for decoder-only).
  vocab_major: step's logits are (V, R) (a tied head; see `Decoder`), `encode`'s first logits still (A, V).
  """
  prepare: Callable
  init: Callable
  encode: Callable
  place: Callable
  step: Callable
  start_token: int | None
  vocab_major: bool = False


def _no_check(config, input_ids_BS, decoder_input_ids_BT) -> None:  # pylint: disable=unused-argument
  return None


@dataclasses.dataclass(frozen=True)
class Family:
  """The hooks and data of one model family (see the module docstring for each hook's contract)."""
  name: str
  config_class: type
  model_types: tuple[str, ...]
  config_from_hf: Callable  # (hf config dict, tensor names, source=) -> config
  config_to_hf: Callable  # config -> hf config dict
  layout_module: str
  tokenizer: str
  param_specs: Callable
  forward: Callable
  decoder: Callable
  batch_logits: Callable
  forward_flops_per_token: Callable
  activation_stacks: Callable
  encode: Callable | None = None
  check_inputs: Callable = _no_check
  image_rows: Callable | None = None
  slot_decoder: Callable | None = None
