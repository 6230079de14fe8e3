"""The points of a sweep and the name of each: grids (`NAME=[v1, v2]`, several multiply) and a variants file (one
JSON object of bindings per line, one more factor), and a trial key that hashes a point's canonical bindings
with the base configuration (the gin files' contents, includes too, and the base `--gin.` bindings).

A trial is named by its key, never by its position, so that a rerun finds its finished, interrupted and failed
trials again, and a grid that gains a value keeps the names of its old points.
"""

import ast
import hashlib
import itertools
import json
import typing


class SpaceError(ValueError):
  """A grid or variants line that cannot be read; the message starts with the flag or FILE:LINE."""


class Point(typing.NamedTuple):
  bindings: dict  # NAME -> Python value, in the order the grids gave them
  places: dict  # NAME -> where the value was given (the flag, or FILE:LINE of a variants file)

  def gin_bindings(self) -> list[str]:
    return [f"{name} = {value!r}" for name, value in self.bindings.items()]

  def flags(self) -> list[str]:
    return [f"--gin.{name}={value!r}" for name, value in self.bindings.items()]


def parse_grid(flag_value: str) -> tuple[str, list]:
  """'NAME=[v1, v2]' -> (NAME, [v1, v2]); the values are Python literals, as in gin."""
  flag = f"--sweep.grid={flag_value}"
  if "=" not in flag_value:
    raise SpaceError(f"{flag}: give NAME=[value, ...]")
  name, values = (s.strip() for s in flag_value.split("=", 1))
  try:
    parsed = ast.literal_eval(values)
  except (ValueError, SyntaxError):
    raise SpaceError(f"{flag}: the values are not a Python list ({values}); quote strings, e.g. "
                     "train.optimizer=['adamw', 'adafactor']") from None
  if not isinstance(parsed, (list, tuple)) or not parsed:
    raise SpaceError(f"{flag}: give a non-empty list of values, e.g. {name}=[1, 2]")
  if len({json.dumps(v) for v in parsed}) != len(parsed):
    raise SpaceError(f"{flag}: a value is given twice")
  return name, list(parsed)


def read_variants(path: str) -> list[tuple[dict, str]]:
  """The variants file's lines: (bindings, "FILE:LINE") for each JSON object (blank lines skipped)."""
  out = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        bindings = json.loads(line)
      except ValueError as e:
        raise SpaceError(f"{path}:{number}: not JSON ({e})") from None
      if not isinstance(bindings, dict) or not bindings:
        raise SpaceError(f"{path}:{number}: give a JSON object of bindings, e.g. {{\"SEED\": 1}}")
      out.append((bindings, f"{path}:{number}"))
  if not out:
    raise SpaceError(f"{path}: no variants in the file")
  return out


def expand(grids: list[str], variants_file: str | None = None) -> list[Point]:
  """Every point: each variants line (if any) times each grid value, grids in the order given (the last varies
  fastest). A name given by two grids, or by a grid and a variant, is refused."""
  factors = []
  if variants_file:
    factors.append([(bindings, {n: place for n in bindings}) for bindings, place in read_variants(variants_file)])
  seen = {}
  for flag_value in grids:
    name, values = parse_grid(flag_value)
    flag = f"--sweep.grid={flag_value}"
    if name in seen:
      raise SpaceError(f"{flag}: {name} is also swept by {seen[name]}")
    seen[name] = flag
    factors.append([({name: v}, {name: flag}) for v in values])
  if not factors:
    raise SpaceError("give at least one --sweep.grid='NAME=[v1, v2]' or --sweep.variants=FILE.jsonl")
  points = []
  for combo in itertools.product(*factors):
    bindings, places = {}, {}
    for b, p in combo:
      clash = set(bindings) & set(b)
      if clash:
        name = sorted(clash)[0]
        raise SpaceError(f"{p[name]}: {name} is also swept by {places[name]}")
      bindings.update(b)
      places.update(p)
    points.append(Point(bindings, places))
  return points


def canonical(bindings: dict) -> str:
  """The bindings as one string that does not depend on the order they were given in."""
  return json.dumps(sorted(bindings.items()), separators=(",", ":"))


def base_fingerprint(files_read: list[str], base_bindings: list[str]) -> str:
  """sha256 of the base configuration: each gin file read (contents, includes too, in reading order) and the
  base bindings in order (a later binding overrides an earlier one)."""
  h = hashlib.sha256()
  for path in files_read:
    with open(path, "rb") as f:
      content = f.read()
    h.update(len(content).to_bytes(8, "little") + content)
  h.update(json.dumps([b.strip() for b in base_bindings]).encode())
  return h.hexdigest()


def trial_key(base: str, point: Point) -> str:
  """The trial's name: 12 hex digits of sha256(base fingerprint, canonical bindings)."""
  return hashlib.sha256(f"{base}\n{canonical(point.bindings)}".encode()).hexdigest()[:12]
