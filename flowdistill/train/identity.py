"""A run's identity: the config values that define what its checkpoints computed.

Every checkpoint stores the run's config (`meta['config']`, JSON). A resumed run compares its
own with the checkpoint's over the identity keys — the seed, the method and its own section,
data, model, path, flow-matching, teacher, optimiser and training settings, less those that
only say how the run is logged, saved, spread over devices (mesh) or evaluated — and refuses any
difference by name unless `config.train.allow_config_change` lists it ('train.steps,optim.lr').
"""

import json

import ml_collections

from flowdistill.errors import UserError

IDENTITY_SECTIONS = ('data', 'model', 'path', 'fm', 'teacher', 'optim', 'train')
HARMLESS_KEYS = frozenset({
    'data.path', 'data.path_env',  # where the same data lives
    'train.log_every', 'train.ckpt_every', 'train.keep', 'train.num_devices',
    'train.steps_per_call', 'train.eval_ema', 'train.allow_config_change',
    'train.mesh.data', 'train.mesh.fsdp',  # checkpoints restore onto any mesh
})


class ConfigChangedError(UserError, ValueError):
  """A resumed run's config differs from its checkpoint's in an identity key."""


def flatten(tree, prefix: str = '') -> dict:
  """{'section.key': value} of a config (a ConfigDict, or its JSON read back as dicts)."""
  flat = {}
  for k, v in tree.items():
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      flat.update(flatten(v, f'{prefix}{k}.'))
    else:
      flat[f'{prefix}{k}'] = v
  return flat


def identity(flat: dict) -> dict:
  """{'section.key': value} of the keys that define the run, of a flattened config."""
  sections = IDENTITY_SECTIONS + (flat['method'],)
  return {k: v for k, v in flat.items()
          if k not in HARMLESS_KEYS and (k in ('seed', 'method') or k.split('.')[0] in sections)}


def allowed_changes(listed: str) -> set[str]:
  """The keys that `train.allow_config_change` ('a.b,c.d') lets differ on resume."""
  return {k.strip().removeprefix('config.') for k in listed.split(',') if k.strip()}


def check_resume(stored_meta: dict, meta: dict, directory: str, step: int) -> None:
  """Refuses to resume the checkpoint `stored_meta` (at `step` in `directory`) under `meta`
  when an identity key differs and is not allowed; checkpoints without a config pass."""
  if 'config' not in stored_meta or 'config' not in meta:
    return
  flat = flatten(json.loads(meta['config']))
  old, new = identity(flatten(json.loads(stored_meta['config']))), identity(flat)
  allowed = allowed_changes(flat.get('train.allow_config_change', ''))
  changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in allowed)
  if changed:
    diffs = '; '.join(f'{k}: {old.get(k, "(absent)")!r} -> {new.get(k, "(absent)")!r}'
                      for k in changed)
    raise ConfigChangedError(
        f'The checkpoint at step {step} in {directory} was made with another config ({diffs}). '
        'Resuming would mix two runs. Use a fresh --workdir, restore the old values, or allow '
        f'the change on purpose with --config.train.allow_config_change={",".join(changed)}.')
