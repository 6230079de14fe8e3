"""The SigLIP vision tower's params (T5Gemma 2's image encoder). Shape letters: t5x_lite/shapes.py, with
C the tower's width, I its MLP width, P the patch size, c the image channels and M the patches per image.

Params (L layers):
  patch_embed/{kernel (P, P, c, C), bias (C,)}     a convolution with stride P, "valid"
  position_embedding/embedding (M, C)              one learned vector per patch, no class token
  layers/{ln1,ln2}/{scale,bias} (L, C)             LayerNorm before attention / before the MLP
  layers/attn/{q,k,v,o}/{kernel (L, C, C), bias (L, C)}
  layers/mlp/{fc1 (L, C, I), fc2 (L, I, C)}/{kernel, bias}
  post_norm/{scale, bias} (C,)
The weights load and export with the model; reading images through them is the vision issue's work.
"""

from t5x_lite.config.siglip import SiglipVisionConfig
from t5x_lite.models.params import ParamSpec

_INIT_STD = 0.02


def param_specs(config: SiglipVisionConfig) -> dict:
  C, I, L, P = config.hidden_size, config.intermediate_size, config.num_layers, config.patch_size
  M = config.patches_per_side ** 2

  def layer_norm(*lead):
    axes = ("layers",) * len(lead) + ("norm",)
    return {"scale": ParamSpec((*lead, C), axes, init="ones"), "bias": ParamSpec((*lead, C), axes, init="zeros")}

  def dense(d_in, d_out, axes):
    return {"kernel": ParamSpec((L, d_in, d_out), ("layers", *axes), scale=_INIT_STD),
            "bias": ParamSpec((L, d_out), ("layers", axes[1]), init="zeros")}

  attn = {name: dense(C, C, ("embed", "mlp") if name != "o" else ("mlp", "embed")) for name in ("q", "k", "v", "o")}
  return {
      "patch_embed": {"kernel": ParamSpec((P, P, config.num_channels, C), (None, None, None, "embed"),
                                          scale=_INIT_STD),
                      "bias": ParamSpec((C,), ("embed",), init="zeros")},
      "position_embedding": {"embedding": ParamSpec((M, C), (None, "embed"), scale=_INIT_STD)},
      "layers": {"ln1": layer_norm(L), "attn": attn, "ln2": layer_norm(L),
                 "mlp": {"fc1": dense(C, I, ("embed", "mlp")), "fc2": dense(I, C, ("mlp", "embed"))}},
      "post_norm": layer_norm(),
  }
