"""Shared pure-function building blocks: norms, attention, masks, positions, MLPs.

Nothing here knows which model family calls it; the family files in `t5x_lite.models` compose these.
Shapes are named in variables by letter codes: B batch, T query length, S key length, D model width,
N query heads, K key/value heads, H head width, F MLP width, V vocabulary, L layers.
"""
