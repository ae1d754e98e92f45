"""Flow / MeanFlow math: the linear path and its time distributions (paths), samplers (ODE teacher sampling
with guidance, MeanFlow k-step jumps) and training objectives (flow matching, CMT, MeanFlow MFD / MFT).

Convention everywhere: t = 1 is noise, t = 0 is data, z_t = (1 - t) x + t e; a velocity model is called
`model(z, t, y)`, a MeanFlow student `model(z, t, y, r=r)` (average velocity over [r, t]; r omitted = t).
The closed-form toy (`mfrae.flow.toy`) is not imported here; import it explicitly.
"""

from mfrae.flow.objectives import (
    CMTLoss,
    FlowMatchingLoss,
    ImprovedSchedule,
    MeanFlowLoss,
    TrainingGuidance,
    TrajectoryPairs,
    adaptive_weighting,
    drop_labels,
    finite_difference_derivative,
    jvp_with_primal,
    meanflow_time_derivative,
    min_snr_velocity_weight,
    progressive_gap_weight,
    trajectory_pairs,
)
from mfrae.flow.paths import (
    PairSampler,
    TimeDistribution,
    broadcast_time,
    conditional_velocity,
    dimension_shift,
    interpolate,
    time_shift,
)
from mfrae.flow.samplers import (
    autoguidance_velocity_fn,
    cfg_velocity_fn,
    conditional_velocity_fn,
    meanflow_grid,
    meanflow_sample,
    ode_grid,
    ode_sample,
    sample_ode,
)

__all__ = [
    # paths
    "TimeDistribution",
    "PairSampler",
    "broadcast_time",
    "interpolate",
    "conditional_velocity",
    "time_shift",
    "dimension_shift",
    # samplers
    "ode_grid",
    "meanflow_grid",
    "conditional_velocity_fn",
    "cfg_velocity_fn",
    "autoguidance_velocity_fn",
    "ode_sample",
    "sample_ode",
    "meanflow_sample",
    # objectives
    "FlowMatchingLoss",
    "CMTLoss",
    "MeanFlowLoss",
    "TrainingGuidance",
    "ImprovedSchedule",
    "TrajectoryPairs",
    "trajectory_pairs",
    "drop_labels",
    "adaptive_weighting",
    "progressive_gap_weight",
    "min_snr_velocity_weight",
    "finite_difference_derivative",
    "jvp_with_primal",
    "meanflow_time_derivative",
]
