"""Feed-forward blocks: plain (`relu`) and gated (`gated-gelu`, GeGLU) variants."""

import jax

from t5x_lite import sharding
from t5x_lite.nn.dropout import dropout

ACTIVATIONS = {
    "relu": jax.nn.relu,
    # transformers' `gelu_new` and `gelu_pytorch_tanh` are both the tanh approximation.
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


def mlp(params: dict, x_BTD: jax.Array, *, activation: str, gated: bool, dropout_rate: float = 0.0,
        rng: jax.Array | None = None) -> jax.Array:
  """`wo(act(wi_0 x) * wi_1 x)` when gated, else `wo(act(wi x))`. Dropout sits before `wo`, as in T5.

  params: gated {"wi_0": (D, F), "wi_1": (D, F), "wo": (F, D)}; plain {"wi": (D, F), "wo": (F, D)}.
  """
  act = ACTIVATIONS[activation]
  dtype = x_BTD.dtype
  if gated:
    h_BTF = act(x_BTD @ params["wi_0"].astype(dtype)) * (x_BTD @ params["wi_1"].astype(dtype))
  else:
    h_BTF = act(x_BTD @ params["wi"].astype(dtype))
  h_BTF = sharding.constrain(h_BTF, ("act_batch", "act_length", "act_mlp"))
  h_BTF = dropout(h_BTF, dropout_rate, rng)
  return h_BTF @ params["wo"].astype(dtype)
