"""pyproject.toml lists the packages by hand (the gin configs travel as t5x_lite.configs, mapped from the top-level
configs/ folder, which setuptools' package finder cannot discover): a new subpackage must be listed too, or a
non-editable install would lack it."""

import os
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_is_listed_in_pyproject():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    setuptools = tomllib.load(f)["tool"]["setuptools"]
  on_disk = set()
  for root, _, files in os.walk(os.path.join(REPO, "t5x_lite")):
    if "__init__.py" in files:
      on_disk.add(os.path.relpath(root, REPO).replace(os.sep, "."))
  for root, _, files in os.walk(os.path.join(REPO, "configs")):
    if "__init__.py" in files:
      on_disk.add("t5x_lite." + os.path.relpath(root, REPO).replace(os.sep, "."))
  assert set(setuptools["packages"]) == on_disk
  assert setuptools["package-dir"] == {"t5x_lite.configs": "configs"}
