"""What a timing table needs to say about the machine: CPU model, cores, SIMD width and the
measured float32 matrix-product rate (XLA, and torch when given), so that ratios measured on
one CPU kind are not read as ratios on another.

  python benchmarks/machine.py     # prints the description as JSON
"""

import json
import os
import platform
import time

import jax
import jax.numpy as jnp

MATMUL_N = 2048


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux) with its family and model numbers, else
  `platform.processor()`. Virtual machines may report a bare name ('AMD EPYC' for Zen 4,
  family 25, and for Zen 5, family 26, whose matrix-product rates differ ~2x): the numbers
  tell them apart."""
  try:
    with open('/proc/cpuinfo') as f:
      fields = {}
      for line in f:
        if not line.strip():
          break
        key, _, value = line.partition(':')
        fields[key.strip()] = value.strip()
  except OSError:
    fields = {}
  if 'model name' in fields:
    return (f"{fields['model name']} (family {fields.get('cpu family', '?')}, model "
            f"{fields.get('model', '?')})")
  return platform.processor() or platform.machine()


def simd_width() -> str:
  """The widest x86 vector extension the CPU reports ('avx512f', 'avx2', ...), or 'unknown'."""
  try:
    with open('/proc/cpuinfo') as f:
      flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
  except OSError:
    return 'unknown'
  for name, bits in (('avx512f', 512), ('avx2', 256), ('avx', 256), ('sse4_2', 128)):
    if name in flags:
      return f'{name} ({bits}-bit)'
  return 'unknown'


def _rate(matmul, block, seconds: float) -> float:
  """GFLOP/s of `matmul()` ([MATMUL_N]^2 @ [MATMUL_N]^2) over at least `seconds`."""
  block(matmul())
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    out = matmul()
    count += 1
  block(out)
  return count * 2 * MATMUL_N**3 / (time.perf_counter() - start) / 1e9


def matmul_gflops(seconds: float = 2.0, torch=None) -> dict:
  """Measured float32 [2048, 2048] matrix-product rate: {'xla': GFLOP/s[, 'torch': ...]}."""
  a = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N))
  dot = jax.jit(jnp.dot)
  rates = {'xla': _rate(lambda: dot(a, a), jax.block_until_ready, seconds)}
  if torch is not None:
    b = torch.randn(MATMUL_N, MATMUL_N)
    rates['torch'] = _rate(lambda: b @ b, lambda out: out.sum().item(), seconds)
  return rates


def describe(seconds: float = 2.0, torch=None) -> dict:
  """The machine as a timing table states it (see the module docstring)."""
  return {'cpu': cpu_model(), 'cores': os.cpu_count(), 'simd': simd_width(),
          'matmul_gflops': matmul_gflops(seconds, torch), 'jax': jax.__version__,
          'jax_devices': [str(d) for d in jax.devices()]}


def headline(info: dict) -> str:
  """One line for the top of a table: 'AMD EPYC ..., 2 cores, avx512f (512-bit), XLA matmul
  123 GFLOP/s'."""
  rates = ', '.join(f'{k} matmul {v:.0f} GFLOP/s' for k, v in info['matmul_gflops'].items())
  return f"{info['cpu']}, {info['cores']} cores, {info['simd']}, {rates}"


if __name__ == '__main__':
  description = describe()
  print(json.dumps(description, indent=1))
  print(headline(description))
