"""The kernel backends of the fused ops (eager, triton, cuda)."""
