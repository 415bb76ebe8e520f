"""Few-step distillation of flow models: flow maps (`flow_map`), reflow and piecewise reflow
with marginal alignment (`reflow`), and chains of local flow-matching blocks (`local_fm`)."""

from flowdistill.fewstep import flow_map, local_fm, reflow

__all__ = ['flow_map', 'local_fm', 'reflow']
