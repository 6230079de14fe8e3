"""Where each T5 / mT5 / umT5 params leaf lives in a transformers checkpoint."""

from t5x_lite.config import T5Config
from t5x_lite.convert.layout import Layout, Rule

# A cross-attention bias table transformers creates but never uses.
IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)

# Each stack's input embedding, which we hold once as `shared.weight`. Old .bin exports store them as copies of
# it; but transformers 5 ties them to it only when equal, and a checkpoint with untied embeddings (saved after
# from_pretrained kept differing ones) feeds each stack its own: such a file must not load as if tied.
COPIES = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}


def _attention(stack: str, sub: str, ours: str, module: str) -> list[Rule]:
  base = f"{stack}.block.{{i}}.layer.{sub}.{module}"
  return [Rule((stack, "layers", ours, "q"), f"{base}.q.weight", "heads_in", True),
          Rule((stack, "layers", ours, "k"), f"{base}.k.weight", "heads_in", True),
          Rule((stack, "layers", ours, "v"), f"{base}.v.weight", "heads_in", True),
          Rule((stack, "layers", ours, "o"), f"{base}.o.weight", "heads_out", True)]


def _stack(config: T5Config, stack: str) -> list[Rule]:
  cross = stack == "decoder"
  ff = "2" if cross else "1"
  block = f"{stack}.block.{{i}}.layer"
  rules = [Rule((stack, "layers", "attn_norm", "scale"), f"{block}.0.layer_norm.weight", stacked=True),
           *_attention(stack, "0", "attn", "SelfAttention"),
           Rule((stack, "layers", "mlp_norm", "scale"), f"{block}.{ff}.layer_norm.weight", stacked=True),
           Rule((stack, "final_norm", "scale"), f"{stack}.final_layer_norm.weight")]
  if cross:
    rules += [Rule((stack, "layers", "cross_norm", "scale"), f"{block}.1.layer_norm.weight", stacked=True),
              *_attention(stack, "1", "cross_attn", "EncDecAttention")]
  wis = ("wi_0", "wi_1") if config.mlp_gated else ("wi",)
  rules += [Rule((stack, "layers", "mlp", w), f"{block}.{ff}.DenseReluDense.{w}.weight", "linear", True)
            for w in (*wis, "wo")]
  relpos = f"{stack}.block.{{i}}.layer.0.SelfAttention.relative_attention_bias.weight"
  if config.relative_bias_per_layer:
    rules.append(Rule((stack, "layers", "relpos"), relpos, stacked=True))
  else:
    rules.append(Rule((stack, "relpos"), relpos.replace("{i}", "0")))
  return rules


def _linear(ours: tuple[str, ...], hf: str) -> list[Rule]:
  return [Rule((*ours, "kernel"), f"{hf}.weight", "linear"), Rule((*ours, "bias"), f"{hf}.bias")]


def layout(config: T5Config) -> list[Rule]:
  """The rules for this config's task (the heads wrap the base model in `transformer.` where HF does)."""
  rules = [Rule(("embed", "embedding"), "shared.weight"), *_stack(config, "encoder")]
  if config.is_encoder_decoder:
    rules += _stack(config, "decoder")
  prefix = ""
  if config.task == "lm" and not config.tie_lm_head:
    rules.append(Rule(("lm_head", "kernel"), "lm_head.weight", "linear"))
  elif config.task == "seq_cls":
    prefix = "transformer."
    rules = [_prefixed(r, prefix) for r in rules]
    rules += _linear(("cls_head", "dense"), "classification_head.dense")
    rules += _linear(("cls_head", "out"), "classification_head.out_proj")
  elif config.task == "token_cls":
    prefix = "transformer."
    rules = [_prefixed(r, prefix) for r in rules]
    rules += _linear(("classifier",), "classifier")
  elif config.task == "qa":
    rules += _linear(("qa_head",), "qa_outputs")
  return rules


def _head_prefix(config: T5Config) -> str:
  return "transformer." if config.task in ("seq_cls", "token_cls") else ""


def ignored(config: T5Config) -> tuple[str, ...]:
  return tuple(_head_prefix(config) + name for name in IGNORED)


def copies(config: T5Config) -> dict[str, str]:
  """HF name -> the layout tensor it must equal when a file holds it (then it is skipped)."""
  prefix = _head_prefix(config)
  return {prefix + name: prefix + source for name, source in COPIES.items()}


def _prefixed(rule: Rule, prefix: str) -> Rule:
  return Rule(rule.ours, prefix + rule.hf, rule.transform, rule.stacked)


LAYOUT = Layout(rules=layout, ignored=ignored, copies=copies)
