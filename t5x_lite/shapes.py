"""The shape letters of t5x_lite, one legend for every package.

Array names end in their axes (`logits_BTV`, `k_BSKH`), and docstrings state shapes with the same letters:

  B  batch rows                          R  rows of a decoding batch: B x W (one per beam)
  W  beams per batch row                 C  candidate continuations kept per row in beam search
  T  target / decoder positions          S  source / encoder positions, or KV-cache slots
  P  prompt positions                    L  layers (of a stack)
  D  model width (d_model)               F  MLP width (d_ff)
  N  query heads                         K  key/value heads (N = K x G)
  G  query heads per key/value head      H  head width (head_dim)
  O  flattened output features (N x H, or K x H)
  V  vocabulary                          X  relative-position buckets
  J  indices chosen along an axis (gathers)
  A  requests admitted into decoding slots together (in-flight batching; R is then the slots)
Images (the vision tower):
  I  images (or pan-and-scan crops)      Q  patches of an image (the tower's positions)
  E  the tower's width                   M  tokens an image becomes in the text (after pooling)

A sliding window or a ring buffer's size is a number, not an axis: it is written out (`window`, `ring`).
This module holds only the legend.
"""
