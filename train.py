"""Pretraining and fine-tuning entry point (gin configs, mesh, orbax checkpoints).

Not built yet: it lands with the pretraining issue (#5). Until then this says so and exits non-zero.
"""

import sys

if __name__ == "__main__":
  print("train.py is not built yet: pretraining lands with issue #5 (UL2 data pipeline, train step, "
        "checkpoints). Nothing was run.", file=sys.stderr)
  sys.exit(2)
