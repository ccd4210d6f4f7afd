"""Forwards of a few conv shapes (batch 256, fp16) per backend, for Nsight Compute:

    ncu --set full -k regex:"igemm|_conv_gemm" --launch-skip 1 python benchmarks/ncu_small_n.py \
        --shape 32 32 56 3 1 1 --backends cuda triton

Each (shape, backend) runs twice (the first call compiles/tunes) in the order given, so --launch-skip/-c pick
the launches to profile. Backend "cuda:<kernel>" forces the CUDA backend's kernel (DLA_FAST_CUDA_KERNEL, e.g.
cuda:wgmma). The default is the small-N conv where the mma.sync kernel trailed Triton (NOTES v6, K7-K9).
"""
import argparse
import os

import torch

from dla_fast import ops
from dla_fast.backends import cuda as _cuda


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", nargs=6, type=int, action="append", metavar=("CIN", "COUT", "H", "K", "STRIDE", "G"),
                    help="input channels, output channels, input size, kernel, stride, groups (repeatable)")
    ap.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    ap.add_argument("--batch", type=int, default=256)
    a = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for cin, cout, h, k, stride, groups in a.shape or [[32, 32, 56, 3, 1, 1]]:
        x = torch.randn(a.batch, cin, h, h, device="cuda", generator=gen).half()
        x = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(cout, cin // groups, k, k, device="cuda", generator=gen) / (k * (cin // groups) ** 0.5)).half()
        b = torch.randn(cout, device="cuda", generator=gen)
        for be in a.backends:
            backend, _, kernel = be.partition(":")
            os.environ["DLA_FAST_CUDA_KERNEL"] = kernel or "auto"
            for _ in range(2):
                ops.conv_bn_act(x, w, b, stride=stride, padding=k // 2, groups=groups, relu=True, backend=backend)
            torch.cuda.synchronize()
            if backend == "cuda":
                print(f"{cin}->{cout} k{k} s{stride} g{groups} @{h}: {be} ran {_cuda.last_kernel()}", flush=True)
    os.environ.pop("DLA_FAST_CUDA_KERNEL", None)


if __name__ == "__main__":
    main()
