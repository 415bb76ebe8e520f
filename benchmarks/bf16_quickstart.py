"""bfloat16 against float32 compute on the quickstart: the final Dopri5 W2 and steps/s.

Runs the README's quickstart command twice in fresh workdirs, once as it is and once with
`--config.model.dtype=bfloat16` (parameters, optimizer state, loss and sampling stay float32);
reads each run's results.json and metrics.jsonl.

python benchmarks/bf16_quickstart.py --out benchmarks/out/bf16_quickstart.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(dtype: str, workdir: str) -> dict:
  """Trains and evaluates the quickstart with compute `dtype`; its W2 and step rate."""
  subprocess.run([sys.executable, '-m', 'flowdistill.main', '--config=configs/quickstart.py',
                  f'--workdir={workdir}', f'--config.model.dtype={dtype}'], cwd=ROOT, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  with open(os.path.join(workdir, 'results.json')) as f:
    rows = {r['sampler']: r for r in json.load(f)['rows']}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rates = [json.loads(line)['steps_per_s'] for line in f][1:]  # the first includes compiling
  return {'dtype': dtype, 'w2_dopri5': rows['dopri5']['w2'],
          'w2_euler_100': rows['euler-100']['w2'], 'steps_per_s': statistics.median(rates)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='benchmarks/out/bf16_quickstart.json')
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    results = [run(dtype, os.path.join(tmp, dtype)) for dtype in ('float32', 'bfloat16')]
  ratio = results[1]['w2_dopri5'] / results[0]['w2_dopri5']
  out = {'runs': results, 'w2_ratio_bf16_over_f32': ratio}
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(out, f, indent=2)
  print('| compute | W2 Dopri5 | W2 Euler-100 | steps/s (median) |\n|---|---|---|---|')
  for r in results:
    print(f"| {r['dtype']} | {r['w2_dopri5']:.4f} | {r['w2_euler_100']:.4f} | "
          f"{r['steps_per_s']:.1f} |")
  print(f'W2 bf16 / f32: {ratio:.3f}')
  return out


if __name__ == '__main__':
  main()
