"""Config sections made from the library's settings dataclasses, and the dataclasses read back.

A frozen dataclass such as `condense.frozen_vae.VAEConfig` is the one place that holds a setting's
default and its check (`__post_init__`). The experiment config carries it as a section with the
same keys (`section(VAEConfig)`, nested dataclasses as nested sections), and the run reads it
back with `from_section(VAEConfig, config.pgfm.vae, 'pgfm.vae')`, so no default is written twice
and no field is copied by hand.
"""

import dataclasses
from typing import Any

from flowdistill.errors import BadInput


def section(cls, *, exclude: tuple[str, ...] = ()) -> dict:
  """{field: default} of the dataclass `cls`, nested dataclass fields as nested dicts; fields
  named in `exclude` are left out (the run supplies them, e.g. a seed shared by the config)."""
  out = {}
  for field in dataclasses.fields(cls):
    if field.name in exclude:
      continue
    value = _default(field)
    out[field.name] = section(type(value)) if dataclasses.is_dataclass(value) else value
  return out


def from_section(cls, values, where: str, **given: Any):
  """`cls(...)` from the section `values` (a ConfigDict or dict holding at least the fields of
  `cls` that `given` does not supply; other keys are ignored) and the keyword values `given`.

  Tuples come back as tuples (ConfigDict may hold lists). A missing field, or a value the
  dataclass refuses, raises `BadInput` (a ValueError) naming the section `config.<where>`.
  """
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name in given:
      kwargs[field.name] = given[field.name]
      continue
    if field.name not in values:
      raise BadInput(f'config.{where}.{field.name} is missing; start configs from the '
                     'registry (flowdistill.experiments.method_config).')
    value, default = values[field.name], _default(field)
    if dataclasses.is_dataclass(default):
      value = from_section(type(default), value, f'{where}.{field.name}')
    elif isinstance(value, (list, tuple)):
      value = tuple(value)
    kwargs[field.name] = value
  try:
    return cls(**kwargs)
  except ValueError as e:
    raise BadInput(f'config.{where}: {e}') from None


def _default(field: dataclasses.Field):
  if field.default is not dataclasses.MISSING:
    return field.default
  if field.default_factory is not dataclasses.MISSING:
    return field.default_factory()
  raise TypeError(f'Field {field.name} has no default; a config section needs one.')
