"""The model config of a run that starts from a checkpoint (`train.init_params_from`).

The checkpoint's own config is the model: a fine-tuning config need not restate its shape, and a value bound in
gin (or passed to `train`) that would make another model is refused, every such field listed at once. Only how
the model computes may change (CHANGEABLE). Comparing tensor shapes alone let a Gemma 3 checkpoint with an
8-token window, query scale 16 and layer types [s, s, full] train silently as gin's 512 / 256 / all-sliding.
"""

import dataclasses

import gin

# How the model computes, not what it computes: a fine-tuning run may choose these.
CHANGEABLE = ("dtype", "param_dtype", "remat", "dropout_rate", "classifier_dropout")


def explicit_fields(config) -> set[str]:
  """The fields of `config` its maker chose: bound in gin for its class, or different from the class default."""
  try:
    bound = {name.rsplit(".", 1)[-1] for name in gin.get_bindings(type(config).__name__)}
  except (ValueError, KeyError):  # a config class gin does not know
    bound = set()
  default = _default_instance(type(config))
  return bound | {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(default, f.name)}


def _default_instance(cls):
  """`cls()` with its defaults only: gin's wrapper around __init__ would apply the bindings in force. Built through
  __init__ (not read off the fields), so a config that normalises itself (T5Gemma 2's stacks) compares alike."""
  instance = object.__new__(cls)
  getattr(cls.__init__, "__wrapped__", cls.__init__)(instance)
  return instance


def config_from_base(config, base, source: str):
  """`base` (the checkpoint's config) with the CHANGEABLE fields `config` sets explicitly.

  ValueError when `config` is of another family or sets any other field to a value that makes a different model
  (compared in the configs' canonical form, e.g. Gemma's layer types written out rather than as a pattern).
  """
  if type(config) is not type(base):
    raise ValueError(f"init_params_from={source} holds a {base.family} model ({type(base).__name__}) but the run "
                     f"configures a {type(config).__name__}: bind train.model = @{type(base).__name__}()")
  explicit = explicit_fields(config)
  chosen = base.replace(**{f: getattr(config, f) for f in CHANGEABLE if f in explicit and hasattr(base, f)})
  merged = chosen.replace(**{f: getattr(config, f) for f in explicit if f not in CHANGEABLE})
  merged_model, chosen_model = merged.canonical(), chosen.canonical()
  differ = [f.name for f in dataclasses.fields(base)
            if getattr(merged_model, f.name) != getattr(chosen_model, f.name)]
  if differ:
    lines = "; ".join(f"{f}: {getattr(config, f)!r} configured, {getattr(base, f)!r} in the checkpoint"
                      for f in differ)
    raise ValueError(f"init_params_from={source}: the model comes from the checkpoint's config, and the run "
                     f"configures {len(differ)} field(s) otherwise ({lines}). Remove those bindings (only "
                     f"{', '.join(CHANGEABLE)} may change), or train from scratch without init_params_from")
  return chosen
