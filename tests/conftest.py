"""Test set-up: 8 simulated CPU devices, and collectives that fail fast instead of hanging."""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
    ' --xla_cpu_collective_call_terminate_timeout_seconds=10')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update('jax_default_matmul_precision', 'highest')
