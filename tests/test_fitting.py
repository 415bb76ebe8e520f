"""The optax update builder and the fitting loop: exactly a hand-written optax step, and a run
killed in the middle resumes from its state file to the same parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flowdistill import fitting

X = jax.random.normal(jax.random.key(0), (64, 3))
Y = X @ jnp.array([[1.0], [-2.0], [0.5]]) + 0.3


def _params():
  return {'w': jnp.zeros((3, 1)), 'b': jnp.zeros((1,))}


def _loss(params, i, x, y):
  """Squared error on a minibatch of 8 drawn from the step index, with a metric as aux."""
  idx = jax.random.randint(jax.random.fold_in(jax.random.key(1), i), (8,), 0, x.shape[0])
  err = x[idx] @ params['w'] + params['b'] - y[idx]
  return jnp.mean(err ** 2), {'max_err': jnp.abs(err).max()}


def _optimizer():
  return optax.adamw(optax.cosine_decay_schedule(0.1, 30), weight_decay=0.1)


def test_update_matches_a_hand_written_optax_step():
  opt = _optimizer()
  params, state = _params(), opt.init(_params())
  out = jax.jit(fitting.make_update(_loss, opt, has_aux=True))(params, state, 3, X, Y)

  @jax.jit
  def by_hand(params, state):
    (loss, aux), grads = jax.value_and_grad(_loss, has_aux=True)(params, 3, X, Y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, aux, grads

  for got, want in zip(out, by_hand(params, state), strict=True):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_array_equal(a, b)

  plain = jax.jit(fitting.make_update(lambda p, *args: _loss(p, *args)[0], opt))(
      params, state, 3, X, Y)
  assert plain.aux is None and float(plain.loss) == float(out.loss)
  np.testing.assert_array_equal(plain.params['w'], out.params['w'])


class _Kill(Exception):
  pass


def test_fit_killed_in_the_middle_resumes_to_the_same_params(tmp_path):
  opt = _optimizer()
  update = fitting.make_update(_loss, opt, has_aux=True)

  def run(state_path=None, on_progress=None):
    return fitting.fit(update, _params(), opt.init(_params()), steps=30, args=(X, Y),
                       progress_every=7, on_progress=on_progress, state_path=state_path)

  calls = []
  whole, history = run(on_progress=lambda done, params, metrics: calls.append(
      (done, float(metrics['loss']))))
  assert [done for done, _ in calls] == [7, 14, 21, 28, 30]
  assert list(history) == ['loss', 'max_err'] and history['loss'].shape == (30,)
  assert calls[-1][1] == history['loss'][-1] and history['loss'][-1] < history['loss'][0]

  def kill(done, params, metrics):
    if done == 21:
      raise _Kill

  path = str(tmp_path / 'state.npz')
  with pytest.raises(_Kill):
    run(path, kill)  # the file is written after on_progress: it holds step 14
  assert int(np.load(path)['step']) == 14
  resumed, again = run(path)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole), strict=True):
    np.testing.assert_array_equal(a, b)
  for name in history:
    np.testing.assert_array_equal(again[name], history[name])
  same, _ = run(path)  # a finished run: nothing left to do
  np.testing.assert_array_equal(same['w'], whole['w'])

  with pytest.raises(ValueError, match='delete it to start over'):
    fitting.fit(update, _params(), opt.init(_params()), steps=20, args=(X, Y), state_path=path)
  wide = {'w': jnp.zeros((3, 2)), 'b': jnp.zeros((2,))}
  with pytest.raises(ValueError, match='delete it to start over'):
    fitting.fit(update, wide, opt.init(wide), steps=30, args=(X, Y), state_path=path)


def test_fit_in_phases_resumes_in_the_phase_that_wrote_the_file(tmp_path):
  """Two phases with a fresh optimizer each (as the image pyramid grows); killed in the second,
  resumed: the first phase is skipped and the second restores its own state."""
  opt = optax.adam(0.05)
  update = fitting.make_update(_loss, opt, has_aux=True)

  def run(state_path=None, on_progress=None):
    params, history = _params(), None
    for start, stop in ((0, 10), (10, 25)):
      params, history = fitting.fit(update, params, opt.init(params), steps=25, start=start,
                                    stop=stop, history=history, args=(X, Y), progress_every=4,
                                    state_path=state_path, on_progress=on_progress)
      params = jax.tree.map(lambda p: 0.5 * p, params)  # the change between phases
    return params, history

  whole, history = run()

  def kill(done, params, metrics):
    if done == 20:
      raise _Kill

  path = str(tmp_path / 'state.npz')
  with pytest.raises(_Kill):
    run(path, kill)
  assert int(np.load(path)['step']) == 16
  resumed, again = run(path)
  np.testing.assert_array_equal(resumed['w'], whole['w'])
  np.testing.assert_array_equal(again['loss'], history['loss'])
  assert history['loss'].shape == (25,)
