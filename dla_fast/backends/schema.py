"""The schemas of the fused ops, written once for both compiled backends.

The CUDA extension defines them in the ``dla_fast`` namespace (``csrc/ops/schema.h`` is generated from this
file by ``csrc/tools/gen_schema.py``; a CPU test checks that the two agree), the Triton backend in
``dla_fast_triton``. Both take the same arguments, so the per-layer plan can hand either backend its
``config``: the backend-specific kernel and tile choice, ``[]`` for the backend's own rule. Each backend may add
ops of its own (``CUDA_ONLY``, ``TRITON_ONLY``).

This module imports nothing, so that ``setup.py`` and the generator can read it without torch.
"""

# op name -> argument list and return type, identical in every namespace. Integers are SymInt: that is what
# torch.library infers from a Python ``int`` annotation (so the Triton ops get these schemas on every torch
# version), and C++ kernels taking int64_t / IntArrayRef register against it unchanged.
OPS = {
    "conv_bn_act": ("(Tensor x, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, SymInt groups, "
                    "Tensor? residual, bool relu, SymInt[] config) -> Tensor"),
    "aggregate": ("(Tensor[] children, Tensor weight, Tensor? bias, Tensor? residual, bool relu, "
                  "SymInt[] config) -> Tensor"),
    "max_pool": "(Tensor x, SymInt k) -> Tensor",
}

# Ops of the CUDA extension alone: the kernel configurations that can run a call, the rule's first, flattened
# (see csrc/ops/plan.h for the encoding). The Triton backend answers the same question in Python.
CUDA_ONLY = {
    "conv_candidates": ("(Tensor x, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, SymInt groups, "
                        "Tensor? residual) -> int[]"),
    "aggregate_candidates": "(Tensor[] children, Tensor weight, Tensor? bias, Tensor? residual) -> int[]",
}

# Ops of the Triton backend alone (the CUDA extension does not define them, so csrc/ops/schema.h leaves them out):
# the fused high-resolution front, stem + level 0 + level 1 in one kernel (dla_fast.ops.front). ``config`` is
# [tf32] + the backend's tile tuple, as for the shared ops.
TRITON_ONLY = {
    "front": ("(Tensor x, Tensor w0, Tensor b0, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
              "SymInt[] config) -> Tensor"),
}

NAMESPACES = {"cuda": "dla_fast", "triton": "dla_fast_triton"}
