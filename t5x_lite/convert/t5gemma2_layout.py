"""Where each T5Gemma 2 params leaf lives in a transformers checkpoint (../shared/reference, section 7.4)."""

from t5x_lite.config.t5gemma2 import T5Gemma2Config
from t5x_lite.convert.layout import Layout, Rule

_ENCODER, _DECODER = "model.encoder.", "model.decoder."
_VISION = "model.encoder.vision_tower."
_PROJECTOR = "model.encoder.multi_modal_projector."


def _stack(ours: str, hf: str) -> list[Rule]:
  """A Gemma 3 stack as T5Gemma 2 names it (its attention norms are pre/post_self_attn_layernorm)."""
  layer = f"{hf}layers.{{i}}."

  def stacked(path, name, transform="copy"):
    return Rule((ours, "layers", *path), layer + name, transform, True)

  return [stacked(("attn_norm", "scale"), "pre_self_attn_layernorm.weight"),
          stacked(("attn", "q"), "self_attn.q_proj.weight", "heads_in"),
          stacked(("attn", "k"), "self_attn.k_proj.weight", "heads_in"),
          stacked(("attn", "v"), "self_attn.v_proj.weight", "heads_in"),
          stacked(("attn", "o"), "self_attn.o_proj.weight", "heads_out"),
          stacked(("attn", "q_norm", "scale"), "self_attn.q_norm.weight"),
          stacked(("attn", "k_norm", "scale"), "self_attn.k_norm.weight"),
          stacked(("post_attn_norm", "scale"), "post_self_attn_layernorm.weight"),
          stacked(("mlp_norm", "scale"), "pre_feedforward_layernorm.weight"),
          stacked(("post_mlp_norm", "scale"), "post_feedforward_layernorm.weight"),
          stacked(("mlp", "wi_0"), "mlp.gate_proj.weight", "linear"),
          stacked(("mlp", "wi_1"), "mlp.up_proj.weight", "linear"),
          stacked(("mlp", "wo"), "mlp.down_proj.weight", "linear"),
          Rule((ours, "final_norm", "scale"), f"{hf}norm.weight")]


def _vision() -> list[Rule]:
  layer = f"{_VISION}encoder.layers.{{i}}."

  def stacked(path, name, transform="copy"):
    return Rule(("vision", "layers", *path), layer + name, transform, True)

  rules = [Rule(("vision", "patch_embed", "kernel"), f"{_VISION}embeddings.patch_embedding.weight", "conv"),
           Rule(("vision", "patch_embed", "bias"), f"{_VISION}embeddings.patch_embedding.bias"),
           Rule(("vision", "position_embedding", "embedding"), f"{_VISION}embeddings.position_embedding.weight"),
           Rule(("vision", "post_norm", "scale"), f"{_VISION}post_layernorm.weight"),
           Rule(("vision", "post_norm", "bias"), f"{_VISION}post_layernorm.bias")]
  for ours, hf in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
    rules += [stacked((ours, "scale"), f"{hf}.weight"), stacked((ours, "bias"), f"{hf}.bias")]
  for ours, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
    rules += [stacked(("attn", ours, "kernel"), f"self_attn.{hf}.weight", "linear"),
              stacked(("attn", ours, "bias"), f"self_attn.{hf}.bias")]
  for name in ("fc1", "fc2"):
    rules += [stacked(("mlp", name, "kernel"), f"mlp.{name}.weight", "linear"),
              stacked(("mlp", name, "bias"), f"mlp.{name}.bias")]
  return rules


def layout(config: T5Gemma2Config) -> list[Rule]:
  rules = [Rule(("embed", "embedding"), f"{_ENCODER}embed_tokens.weight"),
           Rule(("embed", "eoi"), f"{_ENCODER}embed_tokens.eoi_embedding"),
           *_stack("encoder", _ENCODER), *_stack("decoder", _DECODER), *_vision(),
           # Used as x @ W: already (in, out), no transpose.
           Rule(("projector", "kernel"), f"{_PROJECTOR}mm_input_projection_weight"),
           Rule(("projector", "norm", "scale"), f"{_PROJECTOR}mm_soft_emb_norm.weight")]
  if config.task in ("seq_cls", "token_cls"):
    rules += [Rule(("score", "kernel"), "score.out_proj.weight", "linear"),
              Rule(("score", "bias"), "score.out_proj.bias")]
  return rules


def copies(config: T5Gemma2Config) -> dict[str, str]:
  """The decoder's embedding, its eoi vector and the LM head are tied to the encoder's: a file that holds them
  anyway must hold the same values."""
  return {f"{_DECODER}embed_tokens.weight": f"{_ENCODER}embed_tokens.weight",
          f"{_DECODER}embed_tokens.eoi_embedding": f"{_ENCODER}embed_tokens.eoi_embedding",
          "lm_head.out_proj.weight": f"{_ENCODER}embed_tokens.weight"}


def aliases(name: str) -> tuple[str, ...]:
  """Other names of a tensor in files: transformers' in-memory `model.encoder.text_model.*` for the encoder text
  stack, and Hub files' `vision_tower.vision_model.*` for the vision tower."""
  if name.startswith(_VISION):
    return (_VISION + "vision_model." + name[len(_VISION):],)
  for part in ("embed_tokens.", "layers.", "norm."):
    if name.startswith(_ENCODER + part):
      return (_ENCODER + "text_model." + name[len(_ENCODER):],)
  return ()


LAYOUT = Layout(rules=layout, copies=copies, aliases=aliases)
