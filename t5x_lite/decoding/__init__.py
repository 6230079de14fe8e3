"""Model-agnostic decoding: greedy and sampling loops, beam search, token filtering, shape buckets.

A model plugs in through `step_fn(tokens_R, state, t) -> (logits_RV, state)`; nothing here knows a family.
Shape letters: t5x_lite/shapes.py (R = rows, B x W beams).
"""

from t5x_lite.decoding.loop import decode_tokens
from t5x_lite.decoding.sampling import choose_tokens, filter_logits

__all__ = ["choose_tokens", "decode_tokens", "filter_logits"]
