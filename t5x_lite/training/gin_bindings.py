"""Where each gin binding came from, and the checks that name that place: `FILE:LINE` for a line of a gin file, the
flag itself for a binding given on the command line (`--gin.NAME=VALUE`, or a sweep's `--sweep.grid=...`).

gin names an unknown configurable or parameter in a trailing "In file ..., line N" block (a flag is "bindings
string line 1"), an undefined macro with a dump of the whole configuration, and a value of the wrong type not at
all: it surfaced when the configurable was called, after the corpus was read, naming no place. Here all of these
are one line that starts with the place (`located`, `check_macros`, `check_types`).
"""

import os
import re
import typing

import gin
from gin import config_parser

from t5x_lite.config.fields import check_value


class GinConfigError(ValueError):
  """A configuration mistake; the message starts with the file and line (or the flag) that made it."""


class Origin(typing.NamedTuple):
  place: str  # "path:line", or the flag as given
  text: str  # the binding as written ("" for a flag, whose place is its text)

  def prefix(self) -> str:
    return f"{self.place}: {self.text}: " if self.text else f"{self.place}: "


def show_path(path: str) -> str:
  """`path` relative to the working directory when it lies below it, else absolute."""
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel


_GIN_LOCATION = re.compile(r'\n  In (?:file "(.*?)",|bindings string) line (\d+)\n    (.*?)(?:\n    *\^)?(?=\n  In |$)',
                           re.S)


def located(e: Exception, flag: str | None = None) -> str:
  """gin's message for `e` as "PLACE: message": PLACE is the innermost file and line gin reported (with the
  include lines that led there), or `flag` for a binding given on the command line."""
  if isinstance(e, SyntaxError):
    where = flag or (f"{show_path(e.filename)}:{e.lineno}" if e.filename else f"line {e.lineno}")
    text = "" if flag else f" {(e.text or '').strip()}:"
    # gin's message for a bad value ends with "Failed to parse token 'abc'" after a line of Python's ast noise.
    return (f"{where}:{text} {e.msg.splitlines()[-1].strip()} (values are Python literals: quote strings, e.g. "
            "--gin.train.optimizer='\"adamw\"')")
  message = str(e)
  places = _GIN_LOCATION.findall(message)
  head = _GIN_LOCATION.sub("", message).strip()
  if flag:
    return f"{flag}: {head}"
  if not places:
    return head
  path, line, text = places[0]
  outer = "".join(f" (included from {show_path(p)}:{n})" for p, n, _ in places[1:] if p)
  return f"{show_path(path)}:{line}: {text.strip()}: {head}{outer}" if path else f"line {line}: {head}"


def _key(scope: str, selector: str, arg: str) -> tuple[str, str, str]:
  """The binding's identity in gin's config (a configurable's full name), so `train.x` and its module path match."""
  if not arg:  # `NAME = value` binds a macro
    scope, selector, arg = (f"{scope}/{selector}" if scope else selector), "gin.macro", "value"
  pbk = gin.config.ParsedBindingKey.parse((scope, selector, arg))
  return (*pbk.config_key, pbk.arg_name)


def statements(files: list[str], include_path):
  """(path, statement) for each binding statement of the gin files, in the order gin reads them: each include read
  where it stands (`include_path` finds it as gin does)."""
  for path in files:
    with open(path) as f:
      for statement in config_parser.ConfigParser(f, gin.config.ParserDelegate(skip_unknown=True)):
        if isinstance(statement, config_parser.IncludeStatement):
          yield path, statement
          yield from statements([include_path(statement.filename)], include_path)
        elif isinstance(statement, config_parser.BindingStatement):
          yield path, statement


def origins(files: list[str], bindings: list[str], flags: list[str], include_path) -> dict:
  """(scope, configurable, parameter) -> Origin of the binding that holds, the last one read: the gin files in
  order (`statements`), then `bindings` (whose places are `flags`). Call after gin parsed the same files and
  bindings, so that every configurable is known."""
  out = {}
  for path, statement in statements(files, include_path):
    if isinstance(statement, config_parser.BindingStatement):
      scope, selector, arg, _, location = statement
      out[_key(scope, selector, arg)] = Origin(f"{show_path(path)}:{location.line_num}", location.line_content.strip())
  for binding, flag in zip(bindings, flags):
    for statement in config_parser.ConfigParser(binding, gin.config.ParserDelegate(skip_unknown=True)):
      if isinstance(statement, config_parser.BindingStatement):
        out[_key(statement.scope, statement.selector, statement.arg_name)] = Origin(flag, "")
  return out


def value_of(binding_key: str):
  """The value gin binds at `binding_key` ("train.train_steps"), macros followed."""
  value = gin.query_parameter(binding_key)
  for _ in range(100):
    name = _macro_name(value)
    if name is None:
      return value
    value = gin.query_parameter(f"%{name}")
  return value


def _query(key: tuple[str, str, str]):
  scope, selector, arg = key
  return gin.query_parameter(f"{scope}/{selector}.{arg}" if scope else f"{selector}.{arg}")


def _macro_name(value) -> str | None:
  if isinstance(value, gin.config.ConfigurableReference) and value.configurable.wrapped is gin.config.macro:
    return value.scoped_selector.rsplit("/", 1)[0]
  return None


def _flattened(value):
  if isinstance(value, (list, tuple, set)):
    for v in value:
      yield from _flattened(v)
  elif isinstance(value, dict):
    for v in value.values():
      yield from _flattened(v)
  else:
    yield value


def check_macros(where: dict) -> None:
  """GinConfigError at the first binding that reads a macro (`%NAME`) no file or flag defines (gin would print
  the whole configuration and no place)."""
  for key, origin in where.items():
    for value in _flattened(_query(key)):
      name = _macro_name(value)
      if name is not None and (name, "gin.macro", "value") not in where:
        raise GinConfigError(f"{origin.prefix()}no gin file or --gin flag defines the macro {name}; a misspelling?")


def _resolved(key, where: dict):
  """The value bound at `key` with macros followed, and the Origin of the binding that gave it."""
  value, origin = _query(key), where[key]
  for _ in range(100):  # a chain of macros; gin itself refuses cycles
    name = _macro_name(value)
    if name is None or (name, "gin.macro", "value") not in where:
      break
    key = (name, "gin.macro", "value")
    value, origin = _query(key), where[key]
  return value, origin


def _hints(selector: str) -> dict:
  fn_or_cls = gin.get_configurable(selector)
  try:
    return typing.get_type_hints(fn_or_cls)
  except (NameError, TypeError):  # annotations that cannot be evaluated here: nothing to check against
    return {}


def check_types(where: dict) -> None:
  """GinConfigError at the first binding whose value does not have its parameter's annotated type (the checks
  of t5x_lite.config.fields, which the configurables repeat when called). A gin list stands for a tuple (gin
  and JSON have no tuples; the configs convert them); references (`@fn()`) are not checked."""
  for key, origin in where.items():
    scope, selector, arg = key
    if selector == "gin.macro":
      continue  # checked where it is used
    hint = _hints(selector).get(arg)
    if hint is None:
      continue
    value, origin = _resolved(key, where)
    if any(isinstance(v, gin.config.ConfigurableReference) for v in _flattened(value)):
      continue
    try:
      check_value(f"{selector.rsplit('.', 1)[-1]}.{arg}", tuple(value) if isinstance(value, list) else value, hint)
    except ValueError as e:
      raise GinConfigError(f"{origin.prefix()}{e}") from None
