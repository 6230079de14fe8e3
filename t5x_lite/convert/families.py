"""Each registered family's converter layout (the model side's registry names the module; models/ does not import
convert/)."""

import functools
import importlib

from t5x_lite.convert.layout import Layout
from t5x_lite.models.family import Family


@functools.cache
def layout_of(family: Family) -> Layout:
  """The `LAYOUT` of the module `family.layout_module` names."""
  return importlib.import_module(family.layout_module).LAYOUT
