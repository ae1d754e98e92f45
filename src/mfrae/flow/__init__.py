"""Flow / MeanFlow math: the linear path and its time distributions (paths), samplers (ODE sampling of a
velocity model, optionally guided, and MeanFlow k-step jumps) and training objectives (flow matching, CMT,
MeanFlow MFD / MFT).

Convention everywhere: t = 1 is noise, t = 0 is data, z_t = (1 - t) x + t e; a velocity model is called
`model(z, t, y)`, a MeanFlow student `model(z, t, y, r=r)` (average velocity over [r, t]; r omitted = t).
The public names are those of each module's `__all__`. The closed-form toy (`mfrae.flow.toy`) is not
imported here; import it explicitly. Notes on the papers and the official code: docs/meanflow.md.
"""

from mfrae.flow import objectives, paths, samplers
from mfrae.flow.objectives import *  # noqa: F403
from mfrae.flow.paths import *  # noqa: F403
from mfrae.flow.samplers import *  # noqa: F403

__all__ = [*paths.__all__, *samplers.__all__, *objectives.__all__]
