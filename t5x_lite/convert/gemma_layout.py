"""Where each Gemma 1/2/3 params leaf lives in a transformers checkpoint."""

from t5x_lite.config.gemma import GemmaConfig
from t5x_lite.convert.layout import Layout, Rule


def _prefix(config: GemmaConfig) -> str:
  # The multimodal Gemma 3 keeps its text model under language_model; we read (and export) that part only.
  return "model.language_model." if config.model_type == "gemma3" else "model."


def layout(config: GemmaConfig) -> list[Rule]:
  m = _prefix(config)
  layer = f"{m}layers.{{i}}"

  def stacked(ours, hf, transform="copy"):
    return Rule(("layers", *ours), f"{layer}.{hf}", transform, True)

  rules = [Rule(("embed", "embedding"), f"{m}embed_tokens.weight"),
           Rule(("final_norm", "scale"), f"{m}norm.weight"),
           stacked(("attn_norm", "scale"), "input_layernorm.weight"),
           stacked(("attn", "q"), "self_attn.q_proj.weight", "heads_in"),
           stacked(("attn", "k"), "self_attn.k_proj.weight", "heads_in"),
           stacked(("attn", "v"), "self_attn.v_proj.weight", "heads_in"),
           stacked(("attn", "o"), "self_attn.o_proj.weight", "heads_out"),
           stacked(("mlp", "wi_0"), "mlp.gate_proj.weight", "linear"),
           stacked(("mlp", "wi_1"), "mlp.up_proj.weight", "linear"),
           stacked(("mlp", "wo"), "mlp.down_proj.weight", "linear")]
  if config.sandwich_norms:  # Gemma 2/3: post_attention_layernorm really follows attention
    rules += [stacked(("post_attn_norm", "scale"), "post_attention_layernorm.weight"),
              stacked(("mlp_norm", "scale"), "pre_feedforward_layernorm.weight"),
              stacked(("post_mlp_norm", "scale"), "post_feedforward_layernorm.weight")]
  else:  # Gemma 1: despite its name, post_attention_layernorm is the pre-MLP norm
    rules.append(stacked(("mlp_norm", "scale"), "post_attention_layernorm.weight"))
  if config.qk_norm:
    rules += [stacked(("attn", "q_norm", "scale"), "self_attn.q_norm.weight"),
              stacked(("attn", "k_norm", "scale"), "self_attn.k_norm.weight")]
  if config.task == "lm" and not config.tie_lm_head:
    rules.append(Rule(("lm_head", "kernel"), "lm_head.weight", "linear"))
  if config.task in ("seq_cls", "token_cls"):
    rules.append(Rule(("score", "kernel"), "score.weight", "linear"))
    if config.task == "token_cls" and config.token_classification_bias:
      rules.append(Rule(("score", "bias"), "score.bias"))
  return rules


def ignored(config: GemmaConfig) -> tuple[str, ...]:
  return ()


def ignored_prefixes(config: GemmaConfig) -> tuple[str, ...]:
  """The multimodal Gemma 3's vision tower and projector are not part of the text model we load."""
  if config.model_type != "gemma3":
    return ()
  return ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")


def aliases(name: str) -> tuple[str, ...]:
  """Other names the same tensor has in files: released Gemma 3 checkpoints (and transformers' own
  save_pretrained of Gemma3ForConditionalGeneration) write `language_model.model.*`, newer ones
  `model.language_model.*`."""
  if name.startswith("model.language_model."):
    return ("language_model.model." + name[len("model.language_model."):],)
  if name == "lm_head.weight":
    return ("language_model.lm_head.weight",)
  return ()


def export_config(config: GemmaConfig) -> GemmaConfig:
  """The text part of a multimodal Gemma 3 is written back as a text-only `gemma3_text` checkpoint."""
  return config.replace(model_type="gemma3_text") if config.model_type == "gemma3" else config


LAYOUT = Layout(rules=layout, ignored=ignored, ignored_prefixes=ignored_prefixes, aliases=aliases,
                export_config=export_config)
