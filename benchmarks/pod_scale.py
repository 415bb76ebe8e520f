"""Pod scale from this CPU: FSDP memory of compiled steps, DiT and SD-VAE sizes and FLOPs, and
estimates of DiT training on TPU v5e pods.

nice -n 10 python benchmarks/pod_scale.py [--fsdp-dits tiny,S] [--presets S,B,L,XL] \
    [--chips 64,256] [--batches 256,1024] [--mfu 0.4] [--out benchmarks/out/pod_scale.json]

Nothing trains; every number in parts 1 and 2 is XLA's own, on this CPU.

1. FSDP memory, 8 simulated CPU devices: the flow-matching step (`configured.fm_setup`, Adam with
   gradient clipping, one EMA) of the MLP of tests/test_fsdp.py (hidden 512, depth 3, moons,
   batch 64) and of class-conditional DiTs (`--fsdp-dits`) on 32x32x4 latents with 1000 classes
   (batch 16, zeros), compiled by `loop.jit_step` under `make_mesh(8, fsdp=1)` (replicated) and
   `make_mesh(8, fsdp=8)`: `compiled.memory_analysis()` argument and temp bytes (per device),
   and the bytes of device 0's shard of every leaf of the placed state
   (`parallel.place`, sum of `x.addressable_shards[0].data.nbytes`).
2. DiT presets (patch 2, 32x32x4 latents = ImageNet 256 px in an SD latent, 1000 classes,
   float32): parameters from `jax.eval_shape` (nothing allocated), FLOPs per image from
   `jax.jit(...).lower(ShapeDtypeStructs).cost_analysis()` (XLA's HLO cost model before
   optimisation; nothing compiled) of the forward pass (batch 8) and of the whole train step
   (loss, gradient, Adam, EMA; batch 256). The DiT paper's Gflops count multiply-adds, so they
   compare with our FLOPs / 2. Also the SD AutoencoderKL (default config): parameters and
   encode FLOPs of one 256x256 image. A calibration: the temp bytes per image of the compiled
   DiT-S/2 step on one device (slope between batch 4 and 8) against the activation formula
   of part 3 at float32.
3. Estimates at pod scale: DiT-B/2 and XL/2 on TPU v5e-64 / v5e-256, FSDP over all chips
   (mesh data=1, fsdp=chips), global batch 256 and 1024. Train FLOPs per step: the measured
   cost analysis of the train step lowered at that global batch. Per-chip state: params, Adam mu
   and nu and one EMA in float32 (16 bytes per parameter) over the chips, and what
   `parallel.fsdp_spec` would actually shard (arrays with no axis divisible by the chip count
   stay whole). Activations: Korthikanti et al. (2022), s*b*h*(34 + 5*a*s/h) bytes per block,
   16-bit activations, no rematerialisation. Step time: FLOPs / (chips * 197 TFLOP/s bf16 peak
   per v5e chip * the assumed MFU).
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8')
os.environ['JAX_PLATFORMS'] = 'cpu'

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402  (must come after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from flowdistill.data import sources  # noqa: E402
from flowdistill.data.sources import Dataset  # noqa: E402
from flowdistill.experiments import method_config  # noqa: E402
from flowdistill.models import dit  # noqa: E402
from flowdistill.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig  # noqa: E402
from flowdistill.train import configured, loop, parallel  # noqa: E402
from flowdistill.train.step import make_train_step  # noqa: E402

LATENT = (32, 32, 4)  # ImageNet 256 px through the SD VAE (factor 8, 4 channels)
CLASSES = 1000
# DiT paper (Peebles & Xie 2023): parameters (Table 1, millions) and Gflops of the /2 models
# (Table 4; multiply-adds).
PAPER = {'S': (33, 6.06), 'B': (130, 23.01), 'L': (458, 80.71), 'XL': (675, 118.64)}
V5E_PEAK = 197e12  # bf16 FLOP/s per TPU v5e chip (published)
V5E_HBM = 16 * 2**30
STATE_COPIES = 4  # params, Adam mu, Adam nu, one EMA; float32


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def flops(lowered) -> float:
  cost = lowered.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def dit_config(preset: str):
  config = method_config()
  config.model.update(name='dit', dit=preset, patch_size=2)
  config.data.update(conditional=True)
  return config


def abstract_dit(preset: str):
  """(apply_fn, loss_fn, optimizer, abstract TrainState) of the flow-matching DiT step."""
  held = {}

  def build():
    apply_fn, loss_fn, optimizer, state = configured.fm_setup(dit_config(preset),
                                                       Dataset(LATENT, CLASSES))
    held.update(apply_fn=apply_fn, loss_fn=loss_fn, optimizer=optimizer)
    return state

  state = jax.eval_shape(build)
  return held['apply_fn'], held['loss_fn'], held['optimizer'], state


def latent_batch(batch: int, abstract: bool = True) -> dict:
  if abstract:
    return {'x': jax.ShapeDtypeStruct((batch, *LATENT), jnp.float32),
            'label': jax.ShapeDtypeStruct((batch,), jnp.int32)}
  return {'x': np.zeros((batch, *LATENT), np.float32), 'label': np.zeros(batch, np.int32)}


# --- 1. FSDP memory on 8 simulated devices ------------------------------------------------------

def fsdp_memory(name: str, state, loss_fn, optimizer, batch: dict) -> list[dict]:
  rows = []
  for fsdp in (1, 8):
    mesh = parallel.make_mesh(8, fsdp=fsdp)
    start = time.perf_counter()
    placed = parallel.place(state, mesh)
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(placed))
    jitted = loop.jit_step(make_train_step(loss_fn, optimizer), placed, {}, mesh)
    compiled = jitted.lower(placed, parallel.global_batch(batch, mesh), {}).compile()
    memory = compiled.memory_analysis()
    del placed
    rows.append({'model': name, 'fsdp': fsdp, 'params': count(state.params),
                 'placed_state_bytes': per_device,
                 'argument_bytes': memory.argument_size_in_bytes,
                 'temp_bytes': memory.temp_size_in_bytes,
                 'compile_s': time.perf_counter() - start})
    log(f'fsdp {name} fsdp={fsdp}: {rows[-1]}')
  return rows


def part_fsdp(dits: list[str]) -> list[dict]:
  config = method_config()
  config.data.update(name='moons', batch_size=64)
  config.model.update(hidden=512, depth=3, time_dim=32)
  dataset = sources.load(config.data)
  _, loss_fn, optimizer, state = configured.fm_setup(config, dataset)
  rows = fsdp_memory('MLP 512x3 (moons, batch 64)', state, loss_fn, optimizer,
                     next(configured.fm_batches(config, dataset)(0)))
  for preset in dits:
    _, loss_fn, optimizer, state = configured.fm_setup(dit_config(preset), Dataset(LATENT, CLASSES))
    rows += fsdp_memory(f'DiT-{preset}/2 (32x32x4, batch 16)', state, loss_fn, optimizer,
                        latent_batch(16, abstract=False))
    del state
  return rows


# --- 2. DiT presets and the SD VAE -------------------------------------------------------------

def part_presets(presets: list[str], forward_batch: int, train_batch: int, cache: dict):
  rows = []
  for preset in presets:
    apply_fn, loss_fn, optimizer, state = abstract_dit(preset)
    start = time.perf_counter()
    batch = latent_batch(forward_batch)
    t = jax.ShapeDtypeStruct((forward_batch,), jnp.float32)
    forward = flops(jax.jit(functools.partial(conditional_forward, apply_fn)).lower(
        state.params, batch['x'], t, batch['label'])) / forward_batch
    train = train_flops(preset, train_batch, cache) / train_batch
    hidden, depth, heads = dit.PRESETS[preset]
    paper_params, paper_gflops = PAPER.get(preset, (None, None))
    rows.append({'model': f'DiT-{preset}/2', 'hidden': hidden, 'depth': depth, 'heads': heads,
                 'params': count(state.params), 'paper_params_m': paper_params,
                 'forward_gflops': forward / 1e9, 'forward_gmacs': forward / 2e9,
                 'paper_gflops': paper_gflops,
                 'vs_paper': forward / 2e9 / paper_gflops - 1 if paper_gflops else None,
                 'train_step_gflops_per_image': train / 1e9, 'train_batch': train_batch,
                 'train_over_forward': train / forward, 'seconds': time.perf_counter() - start})
    log(f'preset {rows[-1]}')
  return rows


def conditional_forward(apply_fn, params, x, t, labels):
  return apply_fn(params, x, t, cond=labels)


def train_flops(preset: str, batch: int, cache: dict) -> float:
  """FLOPs of one train step of DiT-`preset`/2 at global `batch` (cost analysis, lowered)."""
  if (preset, batch) not in cache:
    _, loss_fn, optimizer, state = abstract_dit(preset)
    lowered = jax.jit(make_train_step(loss_fn, optimizer)).lower(state, latent_batch(batch), {})
    cache[preset, batch] = flops(lowered)
  return cache[preset, batch]


def part_vae() -> dict:
  held = {}

  def build():
    graphdef, state = nnx.split(AutoencoderKL(AutoencoderKLConfig(), (256, 256, 3),
                                              rngs=nnx.Rngs(0)))
    held['graphdef'] = graphdef
    return nnx.to_pure_dict(state)

  params = jax.eval_shape(build)
  encode = lambda p, x: nnx.merge(held['graphdef'], p).encode(x)
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  result = {'params': count(params), 'expected_params': 83_653_863,
            'encode_gflops_per_image': flops(jax.jit(encode).lower(params, x)) / 1e9}
  log(f'vae {result}')
  return result


def activation_bytes(preset: str, per_chip_batch: float, bytes_per_value: int = 2) -> float:
  """Korthikanti et al. (2022): s*b*h*(34 + 5*a*s/h) bytes per block at 16-bit activations, no
  rematerialisation (scaled by bytes_per_value / 2 for other widths)."""
  hidden, depth, heads = dit.PRESETS[preset]
  tokens = (LATENT[0] // 2) * (LATENT[1] // 2)
  per_block = tokens * per_chip_batch * hidden * (34 + 5 * heads * tokens / hidden)
  return depth * per_block * bytes_per_value / 2


def part_calibration(preset: str = 'S', batches=(4, 8)) -> dict:
  """Temp bytes per image of the compiled step on one device, against the formula (float32)."""
  _, loss_fn, optimizer, state = abstract_dit(preset)
  mesh = parallel.make_mesh(1)
  temp = []
  for batch in batches:
    jitted = loop.jit_step(make_train_step(loss_fn, optimizer), state, {}, mesh)
    compiled = jitted.lower(state, latent_batch(batch), {}).compile()
    temp.append(compiled.memory_analysis().temp_size_in_bytes)
  measured = (temp[1] - temp[0]) / (batches[1] - batches[0])
  formula = activation_bytes(preset, 1, bytes_per_value=4)
  result = {'model': f'DiT-{preset}/2', 'batches': list(batches), 'temp_bytes': temp,
            'measured_bytes_per_image': measured, 'formula_fp32_bytes_per_image': formula,
            'measured_over_formula': measured / formula}
  log(f'calibration {result}')
  return result


# --- 3. Estimates at pod scale -----------------------------------------------------------------

def rule_state_bytes(state, chips: int) -> float:
  """Per-chip bytes of `state` sharded by `parallel.fsdp_spec` over `chips` FSDP devices."""
  total = 0
  for x in jax.tree.leaves(state):
    nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    total += nbytes / chips if 'fsdp' in parallel.fsdp_spec(x.shape, chips) else nbytes
  return total


def part_pod(presets: list[str], batches: list[int], chip_counts: list[int], mfu: float,
             cache: dict) -> list[dict]:
  rows = []
  for preset in presets:
    *_, state = abstract_dit(preset)
    params = count(state.params)
    for chips in chip_counts:
      state_even = STATE_COPIES * 4 * params / chips
      state_rule = rule_state_bytes(state, chips)
      for batch in batches:
        step_flops = train_flops(preset, batch, cache)
        activations = activation_bytes(preset, batch / chips)
        rows.append({
            'model': f'DiT-{preset}/2', 'chips': chips, 'global_batch': batch,
            'per_chip_batch': batch / chips, 'params': params,
            'train_flops_per_step': step_flops,
            'state_bytes_per_chip': state_even, 'state_bytes_per_chip_fsdp_rule': state_rule,
            'activation_bytes_per_chip_est': activations,
            'total_bytes_per_chip_est': state_rule + activations,
            'step_s_est': step_flops / (chips * V5E_PEAK * mfu),
            'images_per_s_est': batch * chips * V5E_PEAK * mfu / step_flops})
        log(f'pod {rows[-1]}')
  return rows


# --- Report --------------------------------------------------------------------------------------

def mib(n: float) -> str:
  return f'{n / 2**20:,.1f}'


def gib(n: float) -> str:
  return f'{n / 2**30:.2f}'


def markdown(result: dict) -> str:
  out = ['## FSDP memory of the compiled flow-matching step, 8 simulated CPU devices', '',
         'XLA `memory_analysis()` per device (MiB); placed: device 0\'s shards of the state. '
         'Ratio: fsdp=8 over replicated (fsdp=1).', '',
         '| model | params | mesh | placed state | XLA arguments | XLA temp | args + temp |',
         '|---|---|---|---|---|---|---|']
  rows = result['fsdp']
  for r in rows:
    mesh = 'data=8 (replicated)' if r['fsdp'] == 1 else 'fsdp=8'
    out.append(f'| {r["model"]} | {r["params"]:,} | {mesh} | {mib(r["placed_state_bytes"])} | '
               f'{mib(r["argument_bytes"])} | {mib(r["temp_bytes"])} | '
               f'{mib(r["argument_bytes"] + r["temp_bytes"])} |')
    if r['fsdp'] == 8:
      rep = next(p for p in rows if p['model'] == r['model'] and p['fsdp'] == 1)
      both = (r['argument_bytes'] + r['temp_bytes']) / (rep['argument_bytes'] + rep['temp_bytes'])
      ratios = ' | '.join(f'{r[k] / rep[k]:.3f}' for k in
                          ('placed_state_bytes', 'argument_bytes', 'temp_bytes'))
      out.append(f'| {r["model"]} | | **ratio** | {ratios} | {both:.3f} |')

  out += ['', '## DiT presets (patch 2, 32x32x4 latents, 1000 classes) and the SD VAE', '',
          'FLOPs: XLA cost analysis of the lowered (not compiled) function, float32, per image. '
          'The paper\'s Gflops are multiply-adds, so compare them with FLOPs / 2. Train step: '
          'loss + gradient + Adam + EMA at batch '
          f'{result["presets"][0]["train_batch"] if result["presets"] else "-"}, per image.', '',
          '| model | params | paper params | fwd GFLOPs | fwd GFLOPs / 2 | paper Gflops | '
          'ours/2 vs paper | train-step GFLOPs | train / fwd |',
          '|---|---|---|---|---|---|---|---|---|']
  for r in result['presets']:
    paper = (f'{r["paper_gflops"]:.2f} | {100 * r["vs_paper"]:+.1f}%' if r['paper_gflops']
             else '- | -')
    out.append(f'| {r["model"]} | {r["params"]:,} | {r["paper_params_m"]}M | '
               f'{r["forward_gflops"]:.2f} | {r["forward_gmacs"]:.2f} | {paper} | '
               f'{r["train_step_gflops_per_image"]:.2f} | {r["train_over_forward"]:.2f} |')
  vae = result['vae']
  out += ['', f'SD AutoencoderKL (default config): {vae["params"]:,} parameters (expected '
          f'{vae["expected_params"]:,}); encode of one 256x256 image: '
          f'{vae["encode_gflops_per_image"]:.1f} GFLOPs '
          f'({vae["encode_gflops_per_image"] / 2:.1f} G multiply-adds).']
  cal = result.get('calibration')
  if cal:
    out += ['', f'Activation calibration: the compiled {cal["model"]} step on one CPU device '
            f'needs {mib(cal["measured_bytes_per_image"])} MiB of XLA temp per image (slope '
            f'between batch {cal["batches"][0]} and {cal["batches"][1]}, float32); the formula '
            f'used below gives {mib(cal["formula_fp32_bytes_per_image"])} MiB at float32 '
            f'(measured / formula = {cal["measured_over_formula"]:.2f}).']

  a = result['assumptions']
  out += ['', '## At pod scale (estimates)', '',
          f'**Every number in this table is an estimate.** TPU v5e, FSDP over all chips '
          f'(mesh data=1, fsdp=chips). Assumed: {100 * a["mfu"]:.0f}% MFU of the published '
          f'{a["peak_tflops"]:.0f} bf16 TFLOP/s per chip; train FLOPs = XLA cost analysis of '
          'this library\'s train step lowered at the global batch (not 3x forward); state = '
          'params + Adam mu, nu + one EMA, float32 (16 B/param), evenly over the chips and as '
          '`parallel.fsdp_spec` would shard it; activations = Korthikanti et al. (2022) '
          's*b*h*(34 + 5as/h) bytes per block, bf16, no rematerialisation, at the per-chip batch; '
          'total = rule state + activations (no gathered weights, no XLA temporaries, no '
          f'framework overhead). v5e HBM: {gib(V5E_HBM)} GiB per chip.', '',
          '| model | chips | global batch | params | train TFLOPs / step (est.) | '
          'state GiB/chip, 16B/param / chips (est.) | state GiB/chip, fsdp_spec (est.) | '
          'activations GiB/chip (est.) | total GiB/chip (est.) | step s (est.) | '
          'images/s (est.) |',
          '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in result['pod']:
    out.append(f'| {r["model"]} | v5e-{r["chips"]} | {r["global_batch"]} | '
               f'{r["params"] / 1e6:.1f}M | ~{r["train_flops_per_step"] / 1e12:.1f} | '
               f'~{gib(r["state_bytes_per_chip"])} | ~{gib(r["state_bytes_per_chip_fsdp_rule"])} '
               f'| ~{gib(r["activation_bytes_per_chip_est"])} | '
               f'~{gib(r["total_bytes_per_chip_est"])} | ~{r["step_s_est"]:.3f} | '
               f'~{r["images_per_s_est"]:,.0f} |')
  return '\n'.join(out)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--fsdp-dits', default='tiny,S', help='DiT presets for part 1 ("" none)')
  parser.add_argument('--presets', default='S,B,L,XL')
  parser.add_argument('--pod-presets', default='B,XL')
  parser.add_argument('--chips', default='64,256')
  parser.add_argument('--batches', default='256,1024')
  parser.add_argument('--train-batch', type=int, default=256,
                      help='batch of the per-image train-step FLOPs of part 2')
  parser.add_argument('--mfu', type=float, default=0.4)
  parser.add_argument('--no-calibration', action='store_true')
  parser.add_argument('--out', default='benchmarks/out/pod_scale.json')
  args = parser.parse_args(argv)
  split = lambda s: [v for v in s.split(',') if v]
  start = time.perf_counter()
  cache = {}
  result = {
      'fsdp': part_fsdp(split(args.fsdp_dits)),
      'presets': part_presets(split(args.presets), 8, args.train_batch, cache),
      'vae': part_vae(),
      'calibration': None if args.no_calibration else part_calibration(),
      'pod': part_pod(split(args.pod_presets), [int(b) for b in split(args.batches)],
                      [int(c) for c in split(args.chips)], args.mfu, cache),
      'assumptions': {'mfu': args.mfu, 'peak_tflops': V5E_PEAK / 1e12,
                      'hbm_bytes': V5E_HBM, 'state_copies': STATE_COPIES,
                      'activations': 'Korthikanti et al. 2022, bf16, no remat'},
      'devices': jax.device_count(), 'cpu_count': os.cpu_count(), 'jax': jax.__version__,
  }
  result['seconds'] = time.perf_counter() - start
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(markdown(result))
  return result


if __name__ == '__main__':
  main()
