"""The SigLIP vision tower (T5Gemma 2's image encoder) as pure functions over its params. Shape letters:
t5x_lite/shapes.py (I images, Q patches of an image, E the tower's width, F its MLP width, N heads, H head width);
a patch is `patch` pixels square, Q = (image_size / patch)**2.

Params (L layers):
  patch_embed/{kernel (patch, patch, 3, E), bias (E,)}   a convolution with stride = kernel, "valid"
  position_embedding/embedding (Q, E)                    one learned vector per patch, no class token
  layers/{ln1,ln2}/{scale,bias} (L, E)                   LayerNorm before attention / before the MLP
  layers/attn/{q,k,v}/{kernel (L, E, N*H), bias (L, N*H)}, attn/o/{kernel (L, N*H, E), bias (L, E)}
  layers/mlp/{fc1 (L, E, F), fc2 (L, F, E)}/{kernel, bias}
  post_norm/{scale, bias} (E,)
The tower's last hidden states are what T5Gemma 2 reads; SigLIP's pooling head is not part of it.
"""

import jax

from t5x_lite import sharding
from t5x_lite.config.siglip import SiglipVisionConfig
from t5x_lite.models.layers import dense, scan_layers
from t5x_lite.models.params import ParamSpec
from t5x_lite.nn.attention import dot_product_attention
from t5x_lite.nn.mlp import gelu_tanh
from t5x_lite.nn.norms import layer_norm

_INIT_STD = 0.02
_ACT_IQE = ("act_batch", "act_length", "act_embed")


def param_specs(config: SiglipVisionConfig) -> dict:
  E, F, L, patch = config.hidden_size, config.intermediate_size, config.num_layers, config.patch_size
  Q = config.patches_per_side ** 2

  def norm(*lead):
    axes = ("layers",) * len(lead) + ("norm",)
    return {"scale": ParamSpec((*lead, E), axes, init="ones"), "bias": ParamSpec((*lead, E), axes, init="zeros")}

  def dense_spec(d_in, d_out, axes):
    return {"kernel": ParamSpec((L, d_in, d_out), ("layers", *axes), scale=_INIT_STD),
            "bias": ParamSpec((L, d_out), ("layers", axes[1]), init="zeros")}

  attn = {name: dense_spec(E, E, ("embed", "heads")) for name in ("q", "k", "v")}
  attn["o"] = dense_spec(E, E, ("heads", "embed"))
  return {
      "patch_embed": {"kernel": ParamSpec((patch, patch, config.num_channels, E), (None, None, None, "embed"),
                                          scale=_INIT_STD),
                      "bias": ParamSpec((E,), ("embed",), init="zeros")},
      "position_embedding": {"embedding": ParamSpec((Q, E), (None, "embed"), scale=_INIT_STD)},
      "layers": {"ln1": norm(L), "attn": attn, "ln2": norm(L),
                 "mlp": {"fc1": dense_spec(E, F, ("embed", "mlp")), "fc2": dense_spec(F, E, ("mlp", "embed"))}},
      "post_norm": norm(),
  }


def patchify(pixels_I3HW: jax.Array, patch: int) -> jax.Array:
  """(I, c, height, width) channel-first pixels -> (I, Q, patch * patch * c) flattened patches, row-major over the
  patch grid, each patch flattened (row, column, channel) to match a (patch, patch, c, E) kernel. Multiplying by
  that kernel is the stride-`patch` convolution, without a convolution op."""
  I, c, h, w = pixels_I3HW.shape
  x = pixels_I3HW.reshape(I, c, h // patch, patch, w // patch, patch)
  return x.transpose(0, 2, 4, 3, 5, 1).reshape(I, (h // patch) * (w // patch), patch * patch * c)


def encode_images(params: dict, config: SiglipVisionConfig, pixels_I3HW: jax.Array, dtype) -> jax.Array:
  """The tower's last hidden states (I, Q, E) in `dtype` for normalised pixels (I, c, image_size, image_size)."""
  if pixels_I3HW.shape[1:] != (config.num_channels, config.image_size, config.image_size):
    raise ValueError(f"pixel_values of shape {pixels_I3HW.shape[1:]} per image, but the vision tower reads "
                     f"({config.num_channels}, {config.image_size}, {config.image_size})")
  eps, N = config.layer_norm_eps, config.num_heads
  pe = params["patch_embed"]
  x = dense(patchify(pixels_I3HW.astype(dtype), config.patch_size),
            {"kernel": pe["kernel"].reshape(-1, pe["kernel"].shape[-1]), "bias": pe["bias"]})
  x = sharding.constrain(x + params["position_embedding"]["embedding"].astype(dtype), _ACT_IQE)
  I, Q, E = x.shape

  def layer(x, p, _):
    h = layer_norm(x, p["ln1"]["scale"], p["ln1"]["bias"], eps=eps)
    q, k, v = (dense(h, p["attn"][name]).reshape(I, Q, N, E // N) for name in ("q", "k", "v"))
    a = dot_product_attention(q, k, v, scale=(E // N) ** -0.5).reshape(I, Q, E)
    x = x + dense(a, p["attn"]["o"])
    h = layer_norm(x, p["ln2"]["scale"], p["ln2"]["bias"], eps=eps)
    h = sharding.constrain(gelu_tanh(dense(h, p["mlp"]["fc1"])), ("act_batch", "act_length", "act_mlp"))
    return sharding.constrain(x + dense(h, p["mlp"]["fc2"]), _ACT_IQE)

  x = scan_layers(layer, x, params["layers"], num_layers=config.num_layers)
  return layer_norm(x, params["post_norm"]["scale"], params["post_norm"]["bias"], eps=eps)
