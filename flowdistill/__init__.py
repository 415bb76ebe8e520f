"""flowdistill: flow matching, few-step distillation and dataset distillation with flows.

The stable public API: submodules `paths`, `closed_form`, `couplings`, `auction`, `fm`, `ode`,
`timesampling`, `models`, and the most used functions re-exported here.
"""

from flowdistill import auction, closed_form, couplings, fm, ode, paths, timesampling
from flowdistill.couplings import couple
from flowdistill.fm import make_loss as flow_matching_loss
from flowdistill.models.apply import to_apply_fn
from flowdistill.ode import log_likelihood, sample, solve, velocity_fn
from flowdistill.paths import AffinePath, get_path, linear_path, ou_path, stochastic_path, trig_path

__all__ = [
    'auction', 'closed_form', 'couplings', 'fm', 'ode', 'paths', 'timesampling', 'couple',
    'flow_matching_loss', 'to_apply_fn', 'log_likelihood', 'sample', 'solve', 'velocity_fn',
    'AffinePath', 'get_path', 'linear_path', 'ou_path', 'stochastic_path', 'trig_path',
]
__version__ = '0.1.0'
