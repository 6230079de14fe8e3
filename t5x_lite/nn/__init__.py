"""Shared pure-function building blocks: norms, attention, masks, positions, MLPs.

Nothing here knows which model family calls it; the family files in `t5x_lite.models` compose these.
Shape letters (t5x_lite/shapes.py): in attention T counts query positions and S key positions.
"""
