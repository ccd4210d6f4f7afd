"""Which C++ argument check of dla_fast::conv_bn_act crashes (tests/test_ops_cuda.py::test_cpp_errors_are_clear
segfaulted on the H100). Each check runs in its own process: python benchmarks/segv_repro.py [N]."""
import subprocess
import sys

import torch

CHECKS = [
    "op(x.double(), w.double(), None, [1, 1], [1, 1], 1, None, True)",
    "op(x, w.float(), None, [1, 1], [1, 1], 1, None, True)",
    "op(x, w[:, :8], None, [1, 1], [1, 1], 1, None, True)",
    "op(x, w[:, :8].contiguous(), None, [1, 1], [1, 1], 1, None, True)",
    "op(x, w, None, [1, 1], [1, 1], 1, torch.randn(2, 8, 4, 4, device='cuda', dtype=torch.float16), True)",
    "op(x[:, :, :1, :1], w, None, [1, 1], [0, 0], 1, None, True)",
    "op(x, w.cpu(), None, [1, 1], [1, 1], 1, None, True)",
]

if len(sys.argv) > 1:
    import dla_fast.backends.cuda  # noqa: F401  (loads dla_fast._C)
    x = torch.randn(2, 16, 5, 5, device="cuda", dtype=torch.float16)
    w = torch.randn(8, 16, 3, 3, device="cuda", dtype=torch.float16)
    op = torch.ops.dla_fast.conv_bn_act
    try:
        eval(CHECKS[int(sys.argv[1])])
        print("no error raised")
    except RuntimeError as e:
        print("raised:", str(e).splitlines()[0][:160])
    sys.exit(0)

for i, c in enumerate(CHECKS):
    p = subprocess.run([sys.executable, "-X", "faulthandler", __file__, str(i)], capture_output=True, text=True)
    tail = (p.stdout + p.stderr).strip().splitlines()
    print(f"[{i}] rc={p.returncode} {c}\n    " + "\n    ".join(tail[-3:]))
