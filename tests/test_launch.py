"""The launch scripts' dry runs print the commands they would run, refuse incomplete
invocations, and the Colab notebook trains, evaluates and samples end to end."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / 'launch'
RUN_ARGS = ['--config=configs/mnist.py:mnist', '--workdir=/mnt/shared/runs/m']


def _run(script, *args):
  return subprocess.run(['bash', str(LAUNCH / script), *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=60, check=False)


def _command(line: str) -> list[str]:
  """A printed command line, split as the shell would."""
  return shlex.split(line)


def test_tpu_dry_runs_address_every_host_and_match_the_jax_pin():
  base = ['--dry-run', '--tpu', 'pod', '--zone', 'us-central2-b', '--project', 'p']
  jax_pin = next(line for line in (ROOT / 'requirements.txt').read_text().splitlines()
                 if re.match(r'jax[<>=~!]', line))

  setup = _command(_run('tpu.sh', *base, '--pod', 'setup').stdout)
  assert setup[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod']
  assert {'--zone=us-central2-b', '--worker=all', '--project=p'} <= set(setup)
  remote = next(a for a in setup if a.startswith('--command='))
  assert 'git clone' in remote and 'requirements.txt' in remote
  assert shlex.quote(jax_pin.replace('jax', 'jax[tpu]', 1)) in remote

  pod_start = _run('tpu.sh', *base, '--pod', 'start', '--', *RUN_ARGS).stdout
  remote = next(a for a in _command(pod_start) if a.startswith('--command='))
  assert '--worker=all' in pod_start
  assert 'FLOWDISTILL_DISTRIBUTED=1 python -m flowdistill.main ' + ' '.join(RUN_ARGS) in remote
  single_start = _run('tpu.sh', *base, 'start', '--', *RUN_ARGS).stdout
  assert 'FLOWDISTILL_DISTRIBUTED' not in single_start  # one host: no distributed start-up

  logs = _command(_run('tpu.sh', *base, '--worker', '3', 'logs').stdout)
  assert '--worker=3' in logs and any('tail' in a for a in logs)
  stop = _command(_run('tpu.sh', *base, 'stop').stdout)
  assert '--worker=all' in stop and any('pkill -TERM' in a for a in stop)


def test_pod_dry_run_of_the_imagenet_latent_config_passes_its_flags_and_validates():
  """The command the config's docstring gives: on a pod every host starts the same run."""
  flags = ['--config=configs/imagenet_latent.py:XL', '--workdir=/mnt/shared/runs/sit-xl',
           '--config.data.encode.vae=/mnt/shared/vae/diffusion_pytorch_model.safetensors']
  out = _run('tpu.sh', '--dry-run', '--tpu', 'v5e-64', '--zone', 'us-west4-a', '--pod', 'start',
             '--', *flags).stdout
  remote = next(a for a in _command(out) if a.startswith('--command='))
  assert '--worker=all' in out
  assert 'FLOWDISTILL_DISTRIBUTED=1 python -m flowdistill.main ' + ' '.join(flags) in remote
  from flowdistill.experiments import load_config_file, validate
  config = load_config_file(ROOT / 'configs' / 'imagenet_latent.py', 'XL')
  validate(config, num_devices=64, num_processes=16)  # v5e-64: 16 hosts of 4 chips
  assert (config.model.name, config.model.dit, config.train.mesh.fsdp) == ('dit', 'XL', 8)


@pytest.mark.parametrize('args, message', [
    (['--dry-run', 'setup'], '--tpu NAME and --zone ZONE'),
    (['--dry-run', '--tpu', 't', '--zone', 'z'], 'setup, start, logs or stop'),
    (['--dry-run', '--tpu', 't', '--zone', 'z', 'start'], '--workdir'),
    (['--dry-run', '--tpu', 't', '--zone', 'z', '--nodes', '2', 'start'], 'unknown argument'),
])
def test_tpu_refuses_incomplete_invocations(args, message):
  result = _run('tpu.sh', *args)
  assert result.returncode == 2 and message in result.stderr and not result.stdout


def test_slurm_dry_run_prints_a_batch_script_with_one_task_per_gpu():
  result = _run('slurm_gpu.sh', '--dry-run', '--nodes', '3', '--gpus-per-node', '4',
                '--partition', 'a100', '--grace', '90', '--', *RUN_ARGS)
  assert result.returncode == 0
  lines = result.stdout.splitlines()
  directives = {line for line in lines if line.startswith('#SBATCH')}
  assert {'#SBATCH --nodes=3', '#SBATCH --ntasks-per-node=4', '#SBATCH --gpus-per-task=1',
          '#SBATCH --signal=TERM@90', '#SBATCH --requeue', '#SBATCH --partition=a100',
          '#SBATCH --output=/mnt/shared/runs/m/logs/slurm-%j.out'} <= directives
  srun = _command(next(line for line in lines if line.startswith('srun')))
  assert srun[srun.index('env') + 1:] == [
      'FLOWDISTILL_DISTRIBUTED=1', os.environ.get('PYTHON', 'python'), '-m',
      'flowdistill.main', *RUN_ARGS]
  missing = _run('slurm_gpu.sh', '--dry-run', '--', '--config=configs/quickstart.py')
  assert missing.returncode == 2 and '--workdir' in missing.stderr


def test_local_gpu_dry_run_gives_each_process_one_gpu():
  result = _run('local.sh', '--dry-run', '--gpus', '3', '--', '--config=configs/quickstart.py',
                '--workdir=runs/g')
  commands = [_command(line.split(' > ')[0]) for line in result.stdout.splitlines()
              if line.startswith('env ')]
  assert len(commands) == 3
  for i, command in enumerate(commands):
    assert {f'CUDA_VISIBLE_DEVICES={i}', f'JAX_PROCESS_ID={i}', 'JAX_NUM_PROCESSES=3',
            'JAX_PLATFORMS=cuda', 'FLOWDISTILL_DISTRIBUTED=1'} <= set(command)
    assert not any(a.startswith('XLA_FLAGS') for a in command)


@pytest.mark.slow
def test_colab_notebook_trains_evaluates_and_samples(tmp_path):
  """Runs every code cell but the install cell, with a short budget and a small evaluation."""
  notebook = json.loads((LAUNCH / 'colab.ipynb').read_text())
  cells = [''.join(c['source']) for c in notebook['cells'] if c['cell_type'] == 'code' and
           'setup' not in c['metadata'].get('tags', [])]
  source = '\n\n'.join(cells)
  workdir = tmp_path / 'run'
  for old, new in [('STEPS = 4000', 'STEPS = 60'),
                   ("WORKDIR = 'runs/quickstart'", f'WORKDIR = {str(workdir)!r}'),
                   ('config.train.steps = STEPS\n',
                    ('config.train.steps = STEPS\n'
                     'config.eval.update(num_samples=200, nll_samples=50, euler_steps=(1, 4))\n'))]:
    assert old in source, f'the notebook no longer contains {old!r}'
    source = source.replace(old, new)
  assert not any(line.lstrip().startswith(('!', '%')) for line in source.splitlines())
  script = tmp_path / 'notebook.py'
  script.write_text(source)
  result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, MPLBACKEND='Agg'),
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / 'samples.png').exists() and (workdir / 'results.md').exists()
  nll = float(re.search(r'NLL of 500 fresh data points: ([\d.]+) nats', result.stdout)[1])
  assert 3.466 < nll < 20.0  # a 60-step model: above the entropy, but a finite density
