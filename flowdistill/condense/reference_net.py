"""The whole-data ConvNet of the protocol: the upper reference of every table, and the fixed
feature space of the subset baselines. Trained once by the evaluator's own schedule and cached
on disk, keyed by the data and the protocol."""

import dataclasses
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flowdistill import files
from flowdistill.cache import cache_root, data_fingerprint, load_or_build
from flowdistill.condense.synset_eval import (
  Protocol,
  TestSplit,
  make_net,
  test_accuracy,
  train_networks,
)


class ReferenceNet:
  """A trained ConvNet with batched, jitted `features(x)`; `test_accuracy` on the test split."""

  def __init__(self, graphdef, params, split: TestSplit, test_accuracy: float):
    self._params = params
    self._split = split
    self.test_accuracy = test_accuracy
    self._features = jax.jit(lambda p, x: nnx.merge(graphdef, p).features(x, inference=True))

  def features(self, x, chunk: int = 1000) -> np.ndarray:
    """Images [N, H, W, C] in [-1, 1] -> penultimate features [N, F] (the head's input)."""
    return np.concatenate([
        np.asarray(self._features(self._params, self._split.standardise(x[i:i + chunk])))
        for i in range(0, len(x), chunk)])


def load_or_train(train: dict, split: TestSplit, protocol: Protocol, *, seed: int = 0,
                  cache_dir: str | None = None,
                  on_progress: Callable[[int], None] | None = None) -> ReferenceNet:
  """The whole-data ConvNet: read from the cache, or trained on all of `train` and cached.

  Args:
    train: {'x': float images [N, H, W, C] in [-1, 1], 'label': int [N]}.
    split: the test split and train statistics.
    protocol: schedule and network (`protocol.epochs` over the whole split; `runs` unused).
    seed: the network's key.
    cache_dir: defaults to `cache_root()/reference_nets/<fingerprint of data and protocol>`.
    on_progress: epochs done, after each dispatch (only when training).
  """
  settings = json.dumps({**dataclasses.asdict(protocol), 'runs': 1, 'seed': seed},
                        sort_keys=True)
  folder = cache_dir or files.join(cache_root(), 'reference_nets',
                                   data_fingerprint(train['x'], train['label'], settings))
  x = split.standardise(train['x'])
  graphdef, template = make_net(x.shape[1:], split.num_classes, protocol, jax.random.key(seed))

  def load(folder):
    params = ocp.StandardCheckpointer().restore(files.join(folder, 'params'), template)
    info = files.read_json(files.join(folder, 'info.json'))
    return ReferenceNet(graphdef, params, split, info['test_accuracy'])

  def build(folder):
    keys = jax.random.key(seed)[None]
    params, _ = train_networks(x, jnp.asarray(train['label'], jnp.int32), keys, protocol,
                               split.num_classes, on_progress=on_progress)
    params = jax.tree.map(lambda p: p[0], params)
    acc = float(jax.jit(lambda p, x, y: test_accuracy(graphdef, p, x, y))(
        params, split.standardise(split.x), jnp.asarray(split.label)))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(files.join(folder, 'params'), params)
    checkpointer.wait_until_finished()
    files.write_json(files.join(folder, 'info.json'),
                     {'test_accuracy': acc, 'protocol': json.loads(settings)})
    return ReferenceNet(graphdef, params, split, acc)

  return load_or_build(folder, build, load, describe='reference network')
