"""Declarative checkpoint layouts: one `Rule` per tensor family drives both conversion directions.

A rule names a leaf of our params tree, the transformers tensor name (with `{i}` for the layer index when
the leaf is stacked over layers) and how the array is rearranged. Each transform is written once with its
inverse, so import and export cannot drift apart.
"""

import dataclasses
import math
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: tuple[str, ...]  # path in the params tree
  hf: str  # transformers tensor name; `{i}` is the layer index for stacked leaves
  transform: str = "copy"  # copy | linear | heads_in | heads_out | conv
  stacked: bool = False  # our leaf has a leading layer axis, one HF tensor per layer


def _nothing(config) -> tuple:  # pylint: disable=unused-argument
  return ()


@dataclasses.dataclass(frozen=True)
class Layout:
  """A family's transformers checkpoint layout: its rules, and what else its files may hold.

  rules(config) -> [Rule]; ignored(config) -> names to skip on import; ignored_prefixes(config) -> prefixes of
  names to skip; copies(config) -> {name: layout name it must equal, if present}; aliases(name) -> other names
  the same tensor may have; export_config(config) -> the config as written back to transformers.
  """
  rules: Callable
  ignored: Callable = _nothing
  ignored_prefixes: Callable = _nothing
  copies: Callable = lambda config: {}
  aliases: Callable = lambda name: ()
  export_config: Callable = lambda config: config


def hf_shape(transform: str, ours: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the HF tensor for one (per-layer) leaf of shape `ours`."""
  if transform == "copy":
    return ours
  if transform == "linear":  # torch Linear weight (out, in) <-> kernel (in, out)
    return (ours[1], ours[0])
  if transform == "heads_in":  # (N*H, D) <-> kernel (D, N, H)
    return (math.prod(ours[1:]), ours[0])
  if transform == "heads_out":  # (D, N*H) <-> kernel (N, H, D)
    return (ours[-1], math.prod(ours[:-1]))
  if transform == "conv":  # torch Conv2d (out, in, kh, kw) <-> HWIO kernel (kh, kw, in, out)
    return (ours[3], ours[2], ours[0], ours[1])
  raise ValueError(f"unknown transform {transform!r}")


def to_ours(transform: str, hf: np.ndarray, ours_shape: tuple[int, ...]) -> np.ndarray:
  """HF tensor -> our leaf (a view where possible)."""
  if transform == "copy":
    return hf
  if transform == "conv":
    return hf.transpose(2, 3, 1, 0)
  return hf.T.reshape(ours_shape)


def to_hf(transform: str, ours: np.ndarray) -> np.ndarray:
  """Our leaf -> HF tensor (contiguous)."""
  if transform == "copy":
    return np.ascontiguousarray(ours)
  if transform == "conv":
    return np.ascontiguousarray(ours.transpose(3, 2, 0, 1))
  target = hf_shape(transform, ours.shape)
  return np.ascontiguousarray(ours.reshape(target[::-1]).T)
