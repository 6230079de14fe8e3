"""Packing variable-length examples into fixed-length rows, and the model features of packed rows.

grain does the packing: `grain.experimental.FirstFitPackIterDataset` places each example, in stream order, in
the first of `num_bins` open rows where *every* feature still fits (an example is never split), emits the rows
when one does not fit anywhere, and numbers segments 1, 2, ... per row (0 = padding) with positions restarting
at 0; all features of one example share its segment number. Its iterator state is the parent's state at the
start of the open rows plus the next row to emit, so a restored pipeline re-packs exactly the same rows.
This module owns what goes in (one dict per example) and what the model reads out:

Encoder-decoder (seqio's `EncDecFeatureConverter`, packed), every array (B, L_in) or (B, L_tgt):
  input_ids, encoder_segment_ids, encoder_positions              the packed inputs
  decoder_target_ids, decoder_segment_ids, decoder_positions     the packed targets
  decoder_input_ids      targets shifted right within each segment, `start_id` (0) at each segment start
  decoder_loss_weights   float32, 1 on real target tokens, 0 on padding
  pixel_values           float32 (B, images, 3, height, width), when the examples carry images: each row's images
                         in the order of its image tokens (packed like a feature of that many slots), zeros after

Decoder-only (seqio's `PrefixLMFeatureConverter`; a plain LM is the case of empty inputs), every array (B, L):
  target_ids             inputs + targets of each example, concatenated (what each position predicts)
  input_ids              target_ids shifted right within each segment, `start_id` at each segment start (0 as in
                         seqio; a Gemma-style model passes its BOS)
  segment_ids, positions
  loss_weights           float32, 1 where the predicted token belongs to the targets
  prefix_mask            int32, 1 on the positions that read the start token or an input token: seqio's
                         `decoder_causal_attention`, where a prefix-LM may attend bidirectionally

Padding holds 0 in every feature.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import grain
import numpy as np
from grain import experimental as grain_experimental


def encoder_decoder_example(inputs, targets) -> dict[str, np.ndarray]:
  """The per-example dict the encoder-decoder packer takes: int32 `inputs` and `targets`."""
  return {"inputs": np.asarray(inputs, np.int32), "targets": np.asarray(targets, np.int32)}


def decoder_only_example(inputs, targets) -> dict[str, np.ndarray]:
  """The per-example dict the decoder-only packer takes: `tokens` = inputs + targets (int32 (n,)) and
  `is_target` (int32 (n,)), 1 on the targets' tokens."""
  inputs, targets = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
  is_target = np.concatenate([np.zeros(len(inputs), np.int32), np.ones(len(targets), np.int32)])
  return {"tokens": np.concatenate([inputs, targets]), "is_target": is_target}


def pack_dataset(ds: grain.IterDataset, *, lengths: Mapping[str, int], num_bins: int = 1,
                 pack: bool = True) -> grain.IterDataset:
  """Rows of packed examples: each element a dict with, per feature k of `lengths`, `k`, `k_segment_ids` and
  `k_positions`, each (lengths[k],). `pack=False` puts one example per row (padding only).

  Deterministic: bins are never shuffled. An example longer than its feature's length raises ValueError.
  """
  return grain_experimental.FirstFitPackIterDataset(
      ds, length_struct=dict(lengths), num_packing_bins=num_bins, shuffle_bins=False,
      max_sequences_per_bin=None if pack else 1)


def shift_right_per_segment(tokens_BL: np.ndarray, segment_ids_BL: np.ndarray, start_id: int = 0) -> np.ndarray:
  """seqio's `make_autoregressive_inputs` for packed rows -> (B, L): each segment's tokens shifted right by
  one, `start_id` at its first position, 0 on padding."""
  tokens_BL, segment_ids_BL = np.asarray(tokens_BL), np.asarray(segment_ids_BL)
  B = tokens_BL.shape[0]
  shifted_BL = np.concatenate([np.zeros((B, 1), tokens_BL.dtype), tokens_BL[:, :-1]], axis=1)
  previous_BL = np.concatenate([np.zeros((B, 1), segment_ids_BL.dtype), segment_ids_BL[:, :-1]], axis=1)
  starts_BL = segment_ids_BL != previous_BL  # the token before belongs to another example (or is none)
  out_BL = np.where(starts_BL, start_id, shifted_BL)
  return np.where(segment_ids_BL == 0, 0, out_BL).astype(tokens_BL.dtype)


def encoder_decoder_features(rows: Mapping[str, np.ndarray], *, start_id: int = 0) -> dict[str, np.ndarray]:
  """Model features (see the module docstring) of stacked packed rows: `rows` holds `inputs`, `targets` and
  their `_segment_ids`/`_positions`, each (B, L)."""
  dec_seg_BT = rows["targets_segment_ids"]
  images = {} if "pixel_values" not in rows else {"pixel_values": rows["pixel_values"]}
  return {**images,
      "input_ids": rows["inputs"],
      "encoder_segment_ids": rows["inputs_segment_ids"],
      "encoder_positions": rows["inputs_positions"],
      "decoder_input_ids": shift_right_per_segment(rows["targets"], dec_seg_BT, start_id),
      "decoder_target_ids": rows["targets"],
      "decoder_segment_ids": dec_seg_BT,
      "decoder_positions": rows["targets_positions"],
      "decoder_loss_weights": (dec_seg_BT > 0).astype(np.float32),
  }


def decoder_only_features(rows: Mapping[str, np.ndarray], *, start_id: int = 0) -> dict[str, np.ndarray]:
  """Model features (see the module docstring) of stacked packed rows: `rows` holds `tokens`, `is_target`
  and their `_segment_ids`/`_positions`, each (B, L)."""
  seg_BL = rows["tokens_segment_ids"]
  is_input_BL = ((rows["is_target"] == 0) & (seg_BL > 0)).astype(np.int32)
  # The position that reads the last input token (it predicts the first target) is in the prefix too, and so is
  # the one reading the start token: shift "is input" right with a 1 at each segment start.
  prefix_BL = shift_right_per_segment(is_input_BL, seg_BL, start_id=1)
  return {
      "input_ids": shift_right_per_segment(rows["tokens"], seg_BL, start_id),
      "target_ids": rows["tokens"],
      "segment_ids": seg_BL,
      "positions": rows["tokens_positions"],
      "loss_weights": (rows["is_target"] * (seg_BL > 0)).astype(np.float32),
      "prefix_mask": prefix_BL.astype(np.int32),
  }


def stack_rows(rows: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Packed rows (dicts of (L,)) -> one dict of (B, L)."""
  rows = list(rows)
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _pack_in_memory(examples: list[dict], lengths: Mapping[str, int], num_bins: int, pack: bool) -> dict:
  ds = grain.MapDataset.source(examples).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  rows = list(pack_dataset(ds, lengths=lengths, num_bins=num_bins, pack=pack))
  if not rows:
    raise ValueError("no examples to pack")
  return stack_rows(rows)


def pack_encoder_decoder(examples: Iterable[tuple], *, inputs_length: int, targets_length: int,
                         num_bins: int = 1, pack: bool = True, start_id: int = 0) -> dict[str, np.ndarray]:
  """Packs (inputs, targets) pairs held in memory -> encoder-decoder features, each (rows, L)."""
  packed = _pack_in_memory([encoder_decoder_example(i, t) for i, t in examples],
                           {"inputs": inputs_length, "targets": targets_length}, num_bins, pack)
  return encoder_decoder_features(packed, start_id=start_id)


def pack_decoder_only(examples: Iterable[tuple], *, length: int, num_bins: int = 1, pack: bool = True,
                      start_id: int = 0) -> dict[str, np.ndarray]:
  """Packs (inputs, targets) pairs held in memory -> decoder-only features, each (rows, length)."""
  packed = _pack_in_memory([decoder_only_example(i, t) for i, t in examples],
                           {"tokens": length, "is_target": length}, num_bins, pack)
  return decoder_only_features(packed, start_id=start_id)
