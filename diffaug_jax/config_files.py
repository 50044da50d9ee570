"""Loading `configs/<name>.py` files by path (they are files, not a package), so one config can build on
another: `sibling(__file__, "cifar10_resnet18").get_config(arg)`."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import types
from typing import Sequence


def load_module(path: str | os.PathLike) -> types.ModuleType:
  """Executes a config file and returns it as a module (raises FileNotFoundError naming the path)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(config_file: str, name: str) -> types.ModuleType:
  """The config module `name` next to `config_file` (pass `__file__`)."""
  return load_module(pathlib.Path(config_file).with_name(name + ".py"))


def check_arg(config_file: str, arg, allowed: Sequence) -> None:
  """Refuses a `--config file.py:arg` this config does not know (a typo would otherwise run its default
  recipe). `allowed` lists the args; None stands for no arg (then "" is accepted too)."""
  if arg == "" and None in allowed:
    return
  if arg not in allowed:
    shown = ", ".join("(none)" if a is None else repr(a) for a in allowed)
    raise ValueError(f"{pathlib.Path(config_file).name}: unknown arg {arg!r}; expected one of {shown}")
