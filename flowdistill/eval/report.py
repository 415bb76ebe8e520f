"""Quality and likelihood versus NFE for any set of samplers; tables and figures.

One sampler contract for every method: `sampler(params, x0 [B, ...], cond [B] or None) ->
(x1 [B, ...], nfe)`, jitted, listed as `[(label, sampler, params)]`. Velocity ODE solvers
(`velocity_samplers`), flow-map jumps and chains of blocks all take this form, and `report`
scores them on the data kind at hand: W2 for vectors, a classifier's Fréchet distance for
images, and the NLL of the method's likelihood. A method adds its own results as `Section`s.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import files, ode
from flowdistill.eval import feature_net, metrics, plots

FLOOR_LABEL = 'data (a second sample: the finite-sample floor)'


@dataclasses.dataclass(frozen=True)
class Section:
  """A method's own part of the results: `values` join results.json, `text` the table."""
  values: dict
  text: str


def make_sampler(apply_fn, *, solver: str, steps: int | None = None, rtol: float = 1e-5,
                 atol: float = 1e-5, cfg_scale: float | None = None,
                 null_label: int | None = None):
  """Jitted `(params, x0 [B, ...], cond) -> (x1 [B, ...], nfe)` for one solver setting (an
  unknown `solver` is refused here, before any call)."""
  ode.check_solver(solver)

  @jax.jit
  def run(params, x0, cond):
    v = ode.velocity_fn(apply_fn, params, cond=cond, cfg_scale=cfg_scale, null_label=null_label)
    x1, info = ode.solve(v, x0, solver=solver, steps=steps, rtol=rtol, atol=atol)
    return x1, jnp.asarray(info['nfe'])

  return run


def sample_in_chunks(sampler, params, x0, cond=None, chunk: int = 500):
  """Runs `sampler` over x0 [N, ...] in chunks; returns (samples [N, ...], mean NFE, s/sample)."""
  outs, nfes = [], []
  start = time.perf_counter()
  for i in range(0, x0.shape[0], chunk):
    c = None if cond is None else cond[i:i + chunk]
    x1, nfe = sampler(params, x0[i:i + chunk], c)
    outs.append(np.asarray(x1))
    nfes.append(float(nfe))
  elapsed = time.perf_counter() - start
  return np.concatenate(outs), float(np.mean(nfes)), elapsed / x0.shape[0]


def velocity_samplers(apply_fn, params, eval_config, *, prefix: str = '',
                      cfg_scale: float | None = None, null_label: int | None = None):
  """[(label, sampler, params)]: Euler at each `eval_config.euler_steps`, then the adaptive
  solver; `sampler(params, x0, cond) -> (x1, nfe)` is jitted."""
  settings = [(f'euler-{n}', dict(solver='euler', steps=n)) for n in eval_config.euler_steps]
  settings.append((eval_config.adaptive_solver, dict(
      solver=eval_config.adaptive_solver, rtol=eval_config.rtol, atol=eval_config.atol)))
  return [(prefix + label, make_sampler(apply_fn, cfg_scale=cfg_scale, null_label=null_label,
                                        **kwargs), params) for label, kwargs in settings]


def _run_all(samplers, x0, cond, chunk):
  sizes = {min(chunk, len(x0)), len(x0) % chunk} - {0}  # the chunk shapes sample_in_chunks uses
  for label, sampler, params in samplers:
    for size in sizes:  # compile outside the timing
      jax.block_until_ready(sampler(params, x0[:size], None if cond is None else cond[:size]))
    yield (label, *sample_in_chunks(sampler, params, x0, cond, chunk=chunk))


def _add_moment_drift(rows, outputs, reference):
  if reference is None:
    return
  if reference not in outputs:
    raise ValueError(f'moments_reference={reference!r} is not a sampler label; choose one of '
                     f'{list(outputs)}.')
  for row in rows:
    if row['sampler'] in outputs:
      row.update(metrics.moment_drift(outputs[row['sampler']], outputs[reference]))


def ode_log_likelihood(apply_fn, params, eval_config):
  """`log_likelihood(x [B, ...], cond [B] or None, key) -> (log p [B], info)` of a velocity
  model by its ODE with the divergence, as `eval_config` sets it (jitted once)."""
  ev = eval_config

  @jax.jit
  def log_likelihood(params, x, cond, key):
    return ode.log_likelihood(apply_fn, params, x, key, cond=cond,
                              divergence=ev.nll_divergence, num_probes=ev.nll_probes,
                              solver=ev.adaptive_solver, rtol=ev.rtol, atol=ev.atol)

  return lambda x, cond, key: log_likelihood(params, x, cond, key)


def nll_points(dataset, key, num: int, conditional: bool):
  """The held-out points (and labels, or None) whose likelihood is reported: fresh draws of a
  toy, else the first `num` test rows."""
  if dataset.toy:
    return dataset.reference(key, num), None
  labels = dataset.test['label'][:num] if conditional else None
  return dataset.test['x'][:num], labels


def _vector_rows(samplers, dataset, num, keys):
  k_ref, k_noise, k_sw = keys
  reference = dataset.reference(k_ref, num)
  x0 = np.asarray(ode.noise(k_noise, num, dataset.shape))
  score = lambda x: {'w2': metrics.w2(x, reference),
                     'sliced_w2': float(metrics.sliced_w2(x, reference, k_sw))}
  fresh = (dataset.reference(jax.random.fold_in(k_ref, 1), num) if dataset.toy
           else dataset.test['x'][num:2 * num] if len(dataset.test['x']) >= 2 * num else None)
  rows = [] if fresh is None else [
      {'sampler': FLOOR_LABEL, 'nfe': 0.0, **score(fresh), 's_per_sample': 0.0}]
  outputs = {}
  for label, samples, nfe, per_sample in _run_all(samplers, x0, None, num):
    rows.append({'sampler': label, 'nfe': nfe, **score(samples), 's_per_sample': per_sample})
    outputs[label] = samples
  return rows, outputs, reference


def _image_rows(samplers, dataset, num, k_noise, *, conditional, classifier_steps, seed):
  judge = feature_net.load_or_train(dataset.train, dataset.test, steps=classifier_steps,
                                    seed=seed)
  real_features = judge.features(dataset.test['x'][:num])
  x0 = np.asarray(ode.noise(k_noise, num, dataset.shape))
  cond = np.arange(num) % dataset.num_classes if conditional else None
  rows, outputs = [], {}
  for label, samples, nfe, per_sample in _run_all(samplers, x0, cond, 250):
    row = {'sampler': label, 'nfe': nfe,
           'fd': metrics.frechet_distance(judge.features(samples), real_features)}
    if conditional:
      row['label_accuracy'] = float(np.mean(judge.predict(samples) == cond))
    rows.append(dict(row, s_per_sample=per_sample))
    outputs[label] = samples
  return rows, outputs, cond, judge.test_accuracy


def _plot(workdir, dataset, outputs, rows, reference, cond, velocity_model, k_noise):
  if dataset.shape == (2,):
    nfe = {row['sampler']: row['nfe'] for row in rows}
    panels = {'data': reference, **{f'{label} (NFE {nfe[label]:.0f})': samples
                                    for label, samples in outputs.items()}}
    plots.scatter_panels(files.join(workdir, 'samples.png'), panels)
    if velocity_model is not None:
      apply_fn, params = velocity_model
      _, info = ode.sample(apply_fn, params, k_noise, 300, dataset.shape, solver='euler',
                           steps=50, return_trajectory=True)
      plots.trajectories(files.join(workdir, 'trajectories.png'),
                         np.asarray(info['trajectory']))
  elif len(dataset.shape) == 3:
    for label, samples in outputs.items():
      order = (np.argsort(cond[:100], kind='stable') if cond is not None
               else np.arange(min(len(samples), 100)))
      name = label.replace(' ', '_').replace('/', '_per_')
      plots.image_grid(files.join(workdir, f'samples_{name}.png'), samples[:100][order])


def report(samplers, dataset, eval_config, key, *, conditional: bool = False, seed: int = 0,
           log_likelihood=None, velocity_model=None, workdir: str | None = None,
           sections=(), row_extra: dict | None = None, moments_reference: str | None = None):
  """Scores each sampler against held-out data, and the model's NLL.

  Vectors (2-D toys, tabular sets): W2 and sliced W2 of `eval_config.num_samples` samples
  against as many held-out points, with the W2 between two data samples as the floor; NLL in
  nats beside the true density's where known. Images: Fréchet distance in the features of a
  cached classifier (`feature_net`), how often it agrees with the conditioning label, and
  bits/dim.

  Args:
    samplers: [(label, sampler, params)]; see the module docstring.
    dataset: `data.sources.Dataset`.
    eval_config: `config.eval`.
    key: evaluation key (noise, reference draws, likelihood probes).
    conditional: samples are conditioned on labels `arange(n) % num_classes`.
    seed: the feature classifier's training seed (images).
    log_likelihood: `log_likelihood(x, cond, key) -> (log p [B], info)`; default: the ODE of
      `velocity_model` (`ode_log_likelihood`).
    velocity_model: (apply_fn, params) of a velocity: its NLL and, for 2-D data, its
      trajectories are plotted.
    workdir: where plots go (if `eval_config.plot`).
    sections: the method's `Section`s, added to the results and the table.
    row_extra: {sampler label: {column: value}} added to the rows (extra table columns).
    moments_reference: a sampler label; each row then also gets the drift of its samples'
      mean and covariance from that sampler's (`metrics.moment_drift`).

  Returns:
    (results dict with 'rows', 'nll' (vectors) or 'bpd' (images) and the sections' values,
     the markdown table).
  """
  ev = eval_config
  k_ref, k_noise, k_nll, k_sw = jax.random.split(key, 4)
  images = len(dataset.shape) == 3
  num = min(ev.num_samples, len(dataset.test['x'])) if dataset.test else ev.num_samples
  if images:
    rows, outputs, cond, judge_accuracy = _image_rows(
        samplers, dataset, num, k_noise, conditional=conditional,
        classifier_steps=ev.classifier_steps, seed=seed)
    reference = None
  else:
    rows, outputs, reference = _vector_rows(samplers, dataset, num, (k_ref, k_noise, k_sw))
    cond = None
  _add_moment_drift(rows, outputs, moments_reference)
  for row in rows:
    row.update((row_extra or {}).get(row['sampler'], {}))
  if workdir and ev.plot:
    _plot(workdir, dataset, outputs, rows, reference, cond, velocity_model, k_noise)

  if log_likelihood is None:
    log_likelihood = ode_log_likelihood(*velocity_model, ev)
  x, labels = nll_points(dataset, k_nll, ev.nll_samples, conditional)
  logp, info = log_likelihood(jnp.asarray(x), None if labels is None else jnp.asarray(labels),
                              k_nll)
  result = {'rows': rows, 'nll_nfe': float(info['nfe'])}
  base = ['sampler', 'nfe']
  if images:
    base += ['fd', 'label_accuracy'] if conditional else ['fd']
    result.update(bpd=float(jnp.mean(ode.bits_per_dim(logp, int(np.prod(dataset.shape))))),
                  classifier_test_accuracy=judge_accuracy)
    text = (f'NLL: {result["bpd"]:.4f} bits/dim ({ev.nll_divergence} divergence, '
            f'{len(x)} test images). Fréchet distance in the features of a classifier with '
            f'test accuracy {judge_accuracy:.4f}.')
  else:
    base += ['w2', 'sliced_w2']
    result.update(nll=float(-jnp.mean(logp)), nll_target=dataset.true_nll(np.asarray(x)))
    target = result['nll_target']
    text = (f'NLL (nats, {ev.nll_divergence} divergence, {ev.adaptive_solver}): '
            f'{result["nll"]:.4f}' + ('' if target is None else
                                      f'; under the true density (best possible): {target:.4f}'))
  extra = [c for row in rows for c in row if c not in base and c != 's_per_sample']
  table = markdown_table(rows, base + list(dict.fromkeys(extra)) + ['s_per_sample'])
  table += '\n\n' + text
  for section in sections:
    result.update(section.values)
    table += '\n\n' + section.text
  return result, table


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  """Rows of dicts -> a markdown table with the given columns (floats to 4 significant)."""
  fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(fmt(r.get(c, '')) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines)


def save_results(workdir: str, result: dict, table: str) -> None:
  """Writes `results.json` and `results.md` into the workdir."""
  files.write_json(files.join(workdir, 'results.json'), result)
  files.write_bytes(files.join(workdir, 'results.md'), (table + '\n').encode())
