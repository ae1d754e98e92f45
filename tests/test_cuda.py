"""CUDA fast paths, checked against independent truth (run by `pytest -m cuda`; skipped without a CUDA device):

(a) bf16 autocast: RMSNorm statistics and the Fourier time / interval embeddings stay float32 inside a DiT^DH
    forward, and the bf16 output is close to the float32 forward;
(b) the finite-difference stencil (always float32) under bf16 autocast against a float32 JVP;
(c) fused AdamW against the plain loop implementation and the update written out in float64;
(d) torch.compile (inductor) of a MeanFlow training step: losses and gradients equal the eager step's.

`benchmarks/gpu_check.sh` runs these first on a GPU machine; the CPU counterparts are in tests/test_fast_paths.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import randomize_
from torch.utils._python_dispatch import TorchDispatchMode

from mfrae.flow.objectives import MeanFlowLoss, finite_difference_derivative, jvp_with_primal
from mfrae.flow.paths import TimeDistribution
from mfrae.layers import GaussianFourierEmbedding, RMSNorm
from mfrae.models.dit_dh import DiTDH, DiTDHConfig

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              # torch.func.jvp loads its decompositions with torch.jit.script (torch-internal deprecation)
              pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")]

DEVICE = "cuda"
# Head widths divisible by 8 (flash attention in bf16) and by 4 (2-D RoPE).
SMALL = {"input_size": 8, "in_channels": 32, "hidden_size": (64, 96), "depth": (2, 1), "num_heads": (4, 4),
         "num_classes": 10}
FD_STEP = 5e-3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _student(config: dict, std: float, seed: int = 0) -> DiTDH:
    torch.manual_seed(seed)
    return randomize_(DiTDH(DiTDHConfig(interval_embedding=True, **config)), std).to(DEVICE)


def _inputs(config: dict, batch: int, seed: int):
    """(z_t, t, r, y, w) on the linear path with w = e - x and r < t, on the device."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, config["in_channels"], config["input_size"], config["input_size"])
    x, e = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = 0.05 + 0.9 * torch.rand(batch, generator=g)
    r = t * torch.rand(batch, generator=g)
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    y = torch.randint(0, config["num_classes"], (batch,), generator=g)
    return [v.to(DEVICE) for v in (z, t, r, y, e - x)]


class _StrictFloat32:
    """Float32 without TF32 for matmuls and cuDNN convolutions (restored on exit): the reference computations."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


#################################################################################
#                 (a) bf16 autocast keeps norms and times in float32            #
#################################################################################


class _OpRecorder(TorchDispatchMode):
    """(op name, input dtypes) of every op that runs (after autocast's casts) while `inside` > 0."""

    def __init__(self):
        super().__init__()
        self.inside = 0
        self.calls: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside:
            self.calls.append((func.overloadpacket.__name__,
                               tuple(a.dtype for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def _watch(model: torch.nn.Module, kind: type, recorder: _OpRecorder, seen: list) -> list:
    """Hooks that turn the recorder on inside every `kind` module and keep (module, input, output)."""

    def enter(module, args):
        recorder.inside += 1

    def leave(module, args, output):
        recorder.inside -= 1
        seen.append((module, args[0].detach().clone(), output.detach().clone()))

    handles = []
    for m in model.modules():
        if isinstance(m, kind):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    return handles


def _dtypes_of(calls, names: set[str]) -> set[torch.dtype]:
    return {d for name, dtypes in calls if name in names for d in dtypes}


def test_bf16_autocast_keeps_norm_statistics_and_time_embeddings_float32():
    net = _student(SMALL, std=0.05).eval()
    z, t, r, y, _ = _inputs(SMALL, 8, seed=1)
    with torch.no_grad(), _StrictFloat32():
        reference = net(z, t, y, r=r)

    norm_calls, time_calls = _OpRecorder(), _OpRecorder()
    norms, times = [], []
    handles = _watch(net, RMSNorm, norm_calls, norms) + _watch(net, GaussianFourierEmbedding, time_calls, times)
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            with norm_calls:
                with time_calls:
                    out = net(z, t, y, r=r)
    finally:
        for h in handles:
            h.remove()

    assert out.dtype == torch.bfloat16  # autocast is really on: the output Linear ran in bf16
    # Every RMSNorm (backbone, head, final) took its statistic in float32, whatever its input's dtype.
    assert len(norms) == 2 * sum(SMALL["depth"]) + 1
    assert _dtypes_of(norm_calls.calls, {"pow", "mean", "rsqrt"}) == {torch.float32}
    for module, x, y_norm in norms:
        # x / rms(x) * weight in float64; the layer rounds the normalised x to the input's dtype once
        # (bf16: 2^-9 relative on average, 2^-8 at most; float32: ~1e-7)
        expected = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + module.eps)
        bound = 2.0**-7 if x.dtype == torch.bfloat16 else 1e-5
        assert _rel(y_norm, expected * module.weight.double()) < bound
    # The time and interval embeddings: float32 out, every op inside on float32 inputs, equal to a float32 run.
    assert len(times) == 2
    assert _dtypes_of(time_calls.calls, {"mm", "addmm", "linear", "sin", "cos", "mul", "silu"}) == {torch.float32}
    for module, t_in, emb in times:
        assert emb.dtype == torch.float32
        with torch.no_grad(), _StrictFloat32():
            torch.testing.assert_close(emb, module(t_in), rtol=1e-5, atol=1e-6)
    # bf16 carries 8 mantissa bits (2^-9 relative rounding per op): through 3 blocks the output stays within 3 %
    # of the float32 forward (4e-3 measured under CPU autocast); a broken cast path is off by O(1).
    assert _rel(out, reference) < 3e-2


def test_rmsnorm_of_a_bf16_input_under_autocast_matches_float64():
    """A bf16 input to RMSNorm (the DiT^DH head's residual stream is bf16 under autocast): float32 statistic, the
    result one bf16 rounding from the float64 reference."""
    norm = RMSNorm(256).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    x = (3.0 * torch.randn(4, 16, 256, generator=torch.Generator().manual_seed(2))).to(DEVICE, torch.bfloat16)
    recorder, seen = _OpRecorder(), []
    handles = _watch(norm, RMSNorm, recorder, seen)
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), recorder:
            out = norm(x)
    finally:
        for h in handles:
            h.remove()
    assert _dtypes_of(recorder.calls, {"pow", "mean", "rsqrt"}) == {torch.float32}
    x64 = x.double()
    expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()
    assert _rel(out, expected) < 2.0**-7


#################################################################################
#            (b) the float32 stencil under autocast vs a float32 JVP            #
#################################################################################

FD_MODEL = {"input_size": 4, "in_channels": 32, "hidden_size": (32, 48), "depth": (2, 1), "num_heads": (2, 2),
            "num_classes": 10}


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_stencil_under_bf16_autocast_matches_float32_jvp(seed):
    """The library's central difference (step 5e-3), called inside a bf16 autocast region as the training step
    does, against du/dt by forward-mode AD in strict float32.

    Float32 gives ~4e-4 here (truncation O(d^2) + float32 rounding / (2 d)); a stencil whose network ran in bf16
    gives 0.2-0.9 (tests/test_fast_paths.py, docs/benchmarks.md), and one whose convolutions ran in TF32 (cuDNN's
    default for float32) ~1.4e-2 on this model (TF32 emulated on a CPU). The bound 5e-3 lets only float32 pass.
    This model has |du/dt| ~ 0.7 |u|: the rounding of u is not hidden behind a large derivative."""
    net = _student(FD_MODEL, std=0.05, seed=seed).eval()
    z, t, r, y, w = _inputs(FD_MODEL, 16, seed + 1)
    with torch.no_grad(), _StrictFloat32():
        _, dudt = jvp_with_primal(net, z, t, r, y, w)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fd = finite_difference_derivative(net, z, t, r, y, w, step=FD_STEP)
    assert fd.dtype == torch.float32
    assert _rel(fd, dudt) < 5e-3


#################################################################################
#                     (c) fused AdamW = the update in float64                   #
#################################################################################


def _adamw_float64(p0, grads, lr, betas, eps, weight_decay):
    """AdamW (Loshchilov & Hutter, decoupled weight decay; torch's form) written out in float64."""
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    b1, b2 = betas
    for step, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def test_fused_adamw_matches_the_loop_implementation_and_float64():
    net = _student(SMALL, std=0.05)
    z, t, r, y, _ = _inputs(SMALL, 8, seed=3)
    hyper = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.05}
    # Three steps' gradients of a real loss (the state carries over: bias corrections of steps 1-3).
    grads = []
    for k in range(3):
        net.zero_grad(set_to_none=True)
        net(z * (1 + 0.1 * k), t, y, r=r).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    start = {n: p.detach().clone() for n, p in net.named_parameters() if n in grads[0]}

    finals = {}
    for fused in (True, False):
        params = {n: torch.nn.Parameter(v.clone()) for n, v in start.items()}
        opt = torch.optim.AdamW(params.values(), fused=fused, foreach=None if fused else False, **hyper)
        for g in grads:
            for n, p in params.items():
                p.grad = g[n].clone()
            opt.step()
        finals[fused] = {n: p.detach() for n, p in params.items()}

    for n, p0 in start.items():
        fused, plain = finals[True][n], finals[False][n]
        truth = _adamw_float64(p0, [g[n] for g in grads], **hyper)
        assert _rel(fused, plain) < 1e-6, n
        assert _rel(fused, truth) < 1e-6, n
        # the update itself (3 lr ~ 3e-3 of the weights) to float32's resolution of the weights
        update, true_update = fused.double() - p0.double(), truth - p0.double()
        assert _rel(update, true_update) < 1e-3, n


#################################################################################
#                 (d) torch.compile of a MeanFlow training step                 #
#################################################################################


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_meanflow_training_step_matches_eager(precision):
    """Two steps (objective, backward, fused AdamW) with the student compiled by inductor, as the engine's
    `train.compile`, against the same steps eager from the same weights and random draws.

    adaptive_p = 0 makes the loss the raw squared error (the adaptive weight would squash it towards 1 and hide
    differences). Float32 with TF32 off: only the order of floating-point operations differs (fused kernels), the
    losses agree to 1e-4. bf16: eager rounds every elementwise result to bf16 where inductor keeps float32 inside
    a fused kernel, a few bf16 ulps (2^-8) on the prediction, hence 3e-2."""
    torch._dynamo.reset()
    eager_net = _student(SMALL, std=0.05, seed=4)
    compiled_net = copy.deepcopy(eager_net)
    objective = MeanFlowLoss(time=TimeDistribution.uniform(0.0, 0.999), shift=1.5, fraction_r_neq_t=0.25,
                             r_neq_t_layout="prefix", derivative="finite_difference", adaptive_p=0.0,
                             label_dropout=0.1, null_class=eager_net.null_class)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, SMALL["in_channels"], SMALL["input_size"], SMALL["input_size"], generator=g).to(DEVICE)
    y = torch.randint(0, SMALL["num_classes"], (16,), generator=g).to(DEVICE)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")

    def run(net, model):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
        losses, first_grads = [], None
        for step in range(2):
            torch.manual_seed(100 + step)  # identical (t, r), noise and label dropout in both runs
            with autocast:
                loss = objective(model, x, y, step).float()
            loss.mean().backward()
            if first_grads is None:
                first_grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        return losses, first_grads

    with _StrictFloat32():
        eager_losses, eager_grads = run(eager_net, eager_net)
        compiled_losses, compiled_grads = run(compiled_net, torch.compile(compiled_net))
    bound = 1e-4 if precision == "fp32" else 3e-2
    for eager, compiled in zip(eager_losses, compiled_losses):
        assert torch.isfinite(compiled).all()
        assert _rel(compiled, eager) < bound
    assert _rel(compiled_grads, eager_grads) < (1e-3 if precision == "fp32" else 1e-1)
    assert math.isfinite(compiled_losses[-1].sum().item())


def test_strict_float32_region_turns_tf32_off_and_restores_the_flags():
    from mfrae.layers import strict_float32_region

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        a = torch.randn(512, 512, device=DEVICE) * 1e-3 + 1.0  # TF32 rounds the inputs to 10 mantissa bits
        exact = a.double() @ a.double()
        with torch.autocast("cuda", dtype=torch.bfloat16), strict_float32_region(torch.device(DEVICE)):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            product = a @ a
        assert product.dtype == torch.float32 and _rel(product, exact) < 1e-6
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
