"""Batched, sharded inference over JSONL (generate or score).

Not built yet: it lands with the decoding issue (#4). Until then this says so and exits non-zero.
"""

import sys

if __name__ == "__main__":
  print("infer.py is not built yet: decoding and batched inference land with issue #4. Nothing was run.",
        file=sys.stderr)
  sys.exit(2)
