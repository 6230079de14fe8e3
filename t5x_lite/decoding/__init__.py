"""Model-agnostic decoding: greedy and sampling loops, beam search, token filtering, shape buckets.

A model plugs in through `step_fn(tokens_N, state, t) -> (logits_NV, state)`; nothing here knows a family.
"""

from t5x_lite.decoding.loop import decode_tokens
from t5x_lite.decoding.sampling import choose_tokens, filter_logits

__all__ = ["choose_tokens", "decode_tokens", "filter_logits"]
