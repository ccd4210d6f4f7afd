"""One forward of a small-N 3x3 conv (32->32 @56x56, batch 256, fp16) per backend, for Nsight Compute:

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
        -k regex:"igemm_tc|_conv_gemm" python benchmarks/ncu_small_n.py

The CUDA backend's mma.sync kernel is 2x behind Triton's on this shape (benchmarks/NOTES.md v6, K7/K8); the
profile says where its time goes (stall reasons, L1/L2 traffic) before the next change.
"""
import torch

from dla_fast import ops


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 32, 56, 56, device="cuda", generator=g).half().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(32, 32, 3, 3, device="cuda", generator=g) / 17).half()
    b = torch.randn(32, device="cuda", generator=g)
    for backend in ("cuda", "triton"):
        for _ in range(2):  # the first call compiles/tunes; ncu's -c / --launch-skip pick what to profile
            ops.conv_bn_act(x, w, b, stride=1, padding=1, relu=True, backend=backend)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
