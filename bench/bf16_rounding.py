"""train.py with the numerics of bf16 autocast on a CPU that has no bf16 units: an experiment on precision.

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 bench/bf16_rounding.py --config configs/testbed/base.yaml

Run 7 of docs/testbed.md (bf16 autocast on a Xeon with AMX) is the one testbed build whose look-up reached across
its window; its fp32 rebuild (run 8, same recipe, data and seed) did not. Whether precision or chance decided it
cannot be tested with real bf16 matmuls on a CPU without bf16 units (about 70x slower than fp32 there), so this runs
train.py unchanged, in fp32 (``train.precision`` is forced to fp32), with the inputs and outputs of every linear layer
and of attention rounded to bf16 in the forward and their gradients rounded to bf16 in the backward: the values bf16
autocast multiplies, accumulated in fp32 as oneDNN's and AMX's bf16 kernels do. Not emulated: the rounding inside
attention (torch's CPU flash kernel in bf16 rounds the softmax weights, and in the backward their gradients, to bf16
before the products with V), and the bf16 elementwise ops between linears (SiLU and the gate product of the MLP,
the sum of q's and k's rotary gradients); norms, the loss and the optimizer's weights and moments are fp32 under
autocast too. It covers the Llama sdpa path of the testbed (eager attention's matmuls are not routed) and refuses
ZeRO-3, whose memory-efficient linear replaces torch's linear with its own. It cost about twice fp32's time on the
testbed (docs/testbed.md, run 19), not seventy times. Every other argument goes to train.py as is.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


class RoundToBf16(torch.autograd.Function):
    """x -> x rounded to the nearest bf16 value, kept in fp32; the gradient is rounded the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.to(torch.bfloat16).to(grad.dtype)


def rounded(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` through RoundToBf16 when it is an fp32 tensor (a bias may be None)."""
    return RoundToBf16.apply(x) if x is not None and x.dtype == torch.float32 else x


def patch() -> None:
    """Route torch.nn.functional's linear and scaled_dot_product_attention (what nn.Linear, the chunked loss head and
    transformers' sdpa attention call, looked up at call time) through the rounding."""
    linear, sdpa = F.linear, F.scaled_dot_product_attention

    def bf16_linear(x, weight, bias=None):
        return rounded(linear(rounded(x), rounded(weight), rounded(bias)))

    def bf16_sdpa(query, key, value, *args, **kwargs):
        if F.linear is not bf16_linear:  # ZeRO-3 swaps in its own linear (deepspeed.zero.Init): no rounding there
            raise RuntimeError("bench/bf16_rounding.py: torch's linear was replaced after the patch (ZeRO-3?); "
                               "use a ZeRO stage 0-2 DeepSpeed config")
        return rounded(sdpa(rounded(query), rounded(key), rounded(value), *args, **kwargs))

    F.linear, F.scaled_dot_product_attention = bf16_linear, bf16_sdpa


if __name__ == "__main__":
    patch()
    sys.path.insert(0, str(ROOT))
    sys.argv[0] = str(ROOT / "train.py")
    sys.argv += ["--set", "train.precision=fp32"]  # the rounding stands in for autocast; never both
    runpy.run_path(sys.argv[0], run_name="__main__")
