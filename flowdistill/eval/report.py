"""Quality and likelihood versus NFE for a trained velocity model; tables and figures."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import ode
from flowdistill.data import toy
from flowdistill.eval import feature_net, metrics, plots


def make_sampler(apply_fn, *, solver: str, steps: int | None = None, rtol: float = 1e-5,
                 atol: float = 1e-5, guidance: float | None = None,
                 null_label: int | None = None):
  """Jitted `(params, x0 [B, ...], cond) -> (x1 [B, ...], nfe)` for one solver setting."""

  @jax.jit
  def run(params, x0, cond):
    v = ode.velocity_fn(apply_fn, params, cond=cond, guidance=guidance, null_label=null_label)
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
                      guidance: float | None = None, null_label: int | None = None):
  """[(label, sampler, params)]: Euler at each `eval_config.euler_steps`, then the adaptive
  solver; `sampler(params, x0, cond) -> (x1, nfe)` is jitted."""
  settings = [(f'euler-{n}', dict(solver='euler', steps=n)) for n in eval_config.euler_steps]
  settings.append((eval_config.adaptive_solver, dict(
      solver=eval_config.adaptive_solver, rtol=eval_config.rtol, atol=eval_config.atol)))
  return [(prefix + label, make_sampler(apply_fn, guidance=guidance, null_label=null_label,
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


def toy_report(samplers, dataset, eval_config, key, *, velocity_model, workdir=None,
               moments_reference: str | None = None):
  """W2 vs NFE for each sampler and the exact-trace NLL of a 2-D velocity model.

  Args:
    samplers: [(label, sampler, params)], see `velocity_samplers`.
    velocity_model: (apply_fn, params) whose likelihood and trajectories are reported.
    workdir: where `samples.png` and `trajectories.png` go (if `eval_config.plot`).
    moments_reference: a sampler label; each row then also gets the drift of its samples'
      mean and covariance from that sampler's (`metrics.moment_drift`).

  Returns:
    {'rows': [{'sampler', 'nfe', 'w2', 'sliced_w2', 's_per_sample'}], 'nll': float,
     'nll_target': float or None}.
  """
  n = eval_config.num_samples
  k_ref, k_noise, k_nll, k_sw = jax.random.split(key, 4)
  reference = dataset.reference(k_ref, n)
  x0 = np.asarray(ode.noise(k_noise, n, dataset.shape))
  fresh = dataset.reference(jax.random.fold_in(k_ref, 1), n)
  rows = [{'sampler': 'data (a second sample: the finite-sample floor)', 'nfe': 0.0,
           'w2': metrics.w2(fresh, reference),
           'sliced_w2': float(metrics.sliced_w2(fresh, reference, k_sw)), 's_per_sample': 0.0}]
  panels = {'data': reference}
  outputs = {}
  for label, samples, nfe, per_sample in _run_all(samplers, x0, None, n):
    rows.append({'sampler': label, 'nfe': nfe, 'w2': metrics.w2(samples, reference),
                 'sliced_w2': float(metrics.sliced_w2(samples, reference, k_sw)),
                 's_per_sample': per_sample})
    panels[f'{label} (NFE {nfe:.0f})'] = outputs[label] = samples
  _add_moment_drift(rows, outputs, moments_reference)
  apply_fn, params = velocity_model
  nll_points = dataset.reference(k_nll, eval_config.nll_samples)
  logp, _ = jax.jit(lambda p, x: ode.log_likelihood(
      apply_fn, p, x, solver=eval_config.adaptive_solver, rtol=eval_config.rtol,
      atol=eval_config.atol))(params, nll_points)
  result = {'rows': rows, 'nll': float(-jnp.mean(logp)),
            'nll_target': toy.entropy(dataset.toy) if dataset.toy in ('checkerboard',
                                                                       'gaussian') else None}
  if workdir and eval_config.plot:
    plots.scatter_panels(os.path.join(workdir, 'samples.png'), panels)
    _, info = ode.sample(apply_fn, params, k_noise, 300, dataset.shape, solver='euler',
                         steps=50, return_trajectory=True)
    plots.trajectories(os.path.join(workdir, 'trajectories.png'),
                       np.asarray(info['trajectory']))
  return result


def image_report(samplers, dataset, config, key, *, velocity_model, workdir=None,
                 moments_reference: str | None = None):
  """Fréchet distance (classifier features) vs NFE, label accuracy and bits/dim for images.

  Args:
    samplers: [(label, sampler, params)], see `velocity_samplers`.
    velocity_model: (apply_fn, params) whose bits/dim are reported.
    moments_reference: see `toy_report`.

  Returns:
    {'rows': [{'sampler', 'nfe', 'fd', 'label_accuracy', 's_per_sample'}], 'bpd': float,
     'classifier_test_accuracy': float}.
  """
  ev = config.eval
  n = min(ev.num_samples, dataset.test['x'].shape[0])
  judge = feature_net.load_or_train(dataset.train, dataset.test, steps=ev.classifier_steps,
                                    seed=config.seed)
  real_features = judge.features(dataset.test['x'][:n])
  k_noise, k_nll = jax.random.split(key)
  x0 = np.asarray(ode.noise(k_noise, n, dataset.shape))
  conditional = config.data.conditional
  cond = np.arange(n) % dataset.num_classes if conditional else None
  rows, outputs = [], {}
  for label, samples, nfe, per_sample in _run_all(samplers, x0, cond, 250):
    outputs[label] = samples
    row = {'sampler': label, 'nfe': nfe,
           'fd': metrics.frechet_distance(judge.features(samples), real_features),
           's_per_sample': per_sample}
    if conditional:
      row['label_accuracy'] = float(np.mean(judge.predict(samples) == cond))
    rows.append(row)
    if workdir and ev.plot:
      order = np.argsort(cond[:100], kind='stable') if conditional else np.arange(min(n, 100))
      name = label.replace(' ', '_')
      plots.image_grid(os.path.join(workdir, f'samples_{name}.png'), samples[:100][order])
  _add_moment_drift(rows, outputs, moments_reference)
  apply_fn, params = velocity_model
  nll_x = dataset.test['x'][:ev.nll_samples]
  nll_cond = dataset.test['label'][:ev.nll_samples] if conditional else None
  logp, _ = jax.jit(lambda p, x, c: ode.log_likelihood(
      apply_fn, p, x, k_nll, cond=c, divergence=ev.nll_divergence, num_probes=ev.nll_probes,
      solver=ev.adaptive_solver, rtol=ev.rtol, atol=ev.atol))(params, nll_x, nll_cond)
  bpd = float(jnp.mean(ode.bits_per_dim(logp, int(np.prod(dataset.shape)))))
  return {'rows': rows, 'bpd': bpd, 'classifier_test_accuracy': judge.test_accuracy}


def write_report(workdir: str, result: dict, dataset, config) -> str:
  """Formats `result` as markdown, writes results.json / results.md, returns the table."""
  optional = [c for c in ('nll', 'mean_drift', 'cov_drift')
              if any(c in row for row in result['rows'])]
  if dataset.toy:
    table = markdown_table(result['rows'], ['sampler', 'nfe', 'w2', 'sliced_w2', *optional,
                                            's_per_sample'])
    target = result['nll_target']
    table += (f'\n\nNLL (nats, exact trace, {config.eval.adaptive_solver}): '
              f'{result["nll"]:.4f}'
              + (f'; exact data entropy (best possible): {target:.4f}' if target else ''))
  else:
    columns = ['sampler', 'nfe', 'fd', 'label_accuracy', *optional, 's_per_sample']
    table = markdown_table(result['rows'], columns)
    table += (f'\n\nNLL: {result["bpd"]:.4f} bits/dim ({config.eval.nll_divergence} '
              f'divergence, {config.eval.nll_samples} test images). Fréchet distance in the '
              'features of a classifier with test accuracy '
              f'{result["classifier_test_accuracy"]:.4f}.')
  if 'nll_jumps' in result:
    unit = 'nats, exact log-det' if dataset.toy else 'bits/dim, Hutchinson power-series log-det'
    table += f'\n\nNLL of the k-jump sampler ({unit}): ' + ', '.join(
        f'{k} jumps: {v["nll"]:.4f} (inverse error {v["inverse_error"]:.1e})'
        for k, v in result['nll_jumps'].items())
  if 'window_kl' in result:
    table += ('\n\nPer-window KL(student map of p_t_k || teacher p_t_k+1), nats: '
              + ', '.join(f'{kl:.4f}' for kl in result['window_kl'])
              + f'; telescoping bound sum_k sqrt(KL_k / 2) on TV: {result["tv_bound"]:.4f}')
  save_results(workdir, result, table)
  return table


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  """Rows of dicts -> a markdown table with the given columns (floats to 4 significant)."""
  fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(fmt(r.get(c, '')) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines)


def save_results(workdir: str, result: dict, table: str) -> None:
  """Writes `results.json` and `results.md` into the workdir."""
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(table + '\n')
