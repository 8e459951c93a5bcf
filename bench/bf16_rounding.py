"""train.py with the numerics of bf16 autocast on a CPU that has no bf16 units: an experiment on precision.

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 bench/bf16_rounding.py --config configs/testbed/base.yaml

Run 7 of docs/testbed.md (bf16 autocast on a Xeon with AMX) is the one testbed build whose look-up reached across
its window; its fp32 rebuild (run 8, same recipe, data and seed) did not. Whether precision or chance decided it
cannot be tested with real bf16 matmuls on a CPU without bf16 units (about 70x slower than fp32 there), so this runs
train.py unchanged, in fp32, with the inputs and outputs of every linear layer and of attention rounded to bf16 in
the forward and their gradients rounded to bf16 in the backward: the values bf16 autocast computes with, accumulated
in fp32 as oneDNN's and AMX's bf16 kernels do. Everything else (norms, softmax inside attention, the loss, the
optimizer's fp32 weights and moments) stays fp32, as under autocast. It costs about twice fp32's time (the rounding
passes), not seventy times. Every argument goes to train.py as is; the run is an ordinary run folder.
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
        return rounded(sdpa(rounded(query), rounded(key), rounded(value), *args, **kwargs))

    F.linear, F.scaled_dot_product_attention = bf16_linear, bf16_sdpa


if __name__ == "__main__":
    patch()
    sys.path.insert(0, str(ROOT))
    sys.argv[0] = str(ROOT / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
