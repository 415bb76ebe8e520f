"""Test set-up: 8 simulated CPU devices, collectives that fail fast instead of hanging, and one
XLA compilation cache for the session."""

import atexit
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
    ' --xla_cpu_collective_call_terminate_timeout_seconds=10')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests compile the same programs again (a resumed run, a CLI in a subprocess): a cache
# shared by this session and its subprocesses, fresh each session, cuts the suite by a fifth.
_XLA_CACHE = tempfile.mkdtemp(prefix='flowdistill-tests-xla-')
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ['JAX_COMPILATION_CACHE_DIR'] = _XLA_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.2'

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update('jax_default_matmul_precision', 'highest')
