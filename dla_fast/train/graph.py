"""A training step's forward, loss and backward captured once in a CUDA graph and replayed per batch.

A fused DLA training step issues several hundred kernels (dla34: about 640), and at batch 256 the host can take
longer to issue them one by one than the GPU takes to run them. A CUDA graph replays all of them in one launch, so
the step runs at the speed of its kernels. The optimizer stays outside the graph and runs eagerly on the gradients
the replay leaves in the parameters' ``.grad``: learning-rate schedules, gradient clipping, a GradScaler's inf check
and any optimizer work as they do without a graph, at the cost of the optimizer's few (foreach) launches.

What a captured step needs, as any CUDA graph does: the same input shapes every call (one ``CapturedTrainStep``
per shape), no host synchronisation inside the model or the loss (``.item()``, BatchNorm with ``momentum=None``,
data-dependent shapes; refused before the capture, with the cause), and no DistributedDataParallel (its gradient
all-reduce is not captured here; use the uncaptured step under DDP). It works for any ``nn.Module``, timm's eager
models included, not only the fused ones.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn as nn

__all__ = ["CapturedTrainStep"]


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, on {t.device}"


class CapturedTrainStep:
    """``loss = step(inputs, target)``: forward (under autocast to ``amp_dtype`` when given), ``loss_fn(output,
    target)``, backward (through ``scaler.scale`` when a GradScaler is given), replayed from a CUDA graph captured
    at construction from ``example_inputs`` / ``example_target``; then run the optimizer as usual::

        step = CapturedTrainStep(model, nn.CrossEntropyLoss(), images, labels, amp_dtype=torch.bfloat16)
        for images, labels in loader:
            loss = step(images, labels)   # gradients now in p.grad
            optimizer.step()

    Each call overwrites the gradients (it does not accumulate them, so ``zero_grad`` is not needed, and is
    harmless) and re-attaches them to the parameters, so ``zero_grad(set_to_none=True)`` between calls is harmless
    too. The returned loss is a tensor the next call overwrites: ``.item()`` or ``.clone()`` it to keep it. BN
    running statistics update on every call, as in the uncaptured step.

    Construction runs ``warmup`` uncaptured steps on a side stream (kernels compile and select their configs
    outside the capture) and one more with host synchronisation forbidden (a step that synchronises is refused
    with the reason before any capture starts), on the example batch, then restores every buffer of the model
    (BN running statistics and counters) to its value before, so that the model's state is as if only the calls
    had run. The parameters' gradients become the step's own tensors (whatever ``.grad`` held before is dropped).
    The graph keeps the step's activations allocated between calls (its memory pool): about the peak memory of one
    step.

    The graph reads its batch from two tensors of its own, :attr:`inputs` and :attr:`target`, which each call
    fills (a call given those very tensors copies nothing). They are copies of the examples, or with
    ``donate_examples=True`` the example tensors themselves, which the calls then overwrite: no second copy of a
    batch in memory.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 example_inputs: torch.Tensor, example_target: torch.Tensor, *,
                 amp_dtype: Optional[torch.dtype] = None, scaler: Optional["torch.amp.GradScaler"] = None,
                 warmup: int = 3, donate_examples: bool = False):
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, DistributedDataParallel):
            raise TypeError("CapturedTrainStep does not capture DistributedDataParallel (its gradient all-reduce "
                            "runs outside a graph here); capture the model without DDP on one GPU, or run the "
                            "uncaptured step under DDP")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (output, target) -> loss, got {type(loss_fn).__name__}")
        examples = (("example_inputs", example_inputs), ("example_target", example_target))
        for name, t in examples:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        for name, t in examples:
            if t.device.type != "cuda":
                raise ValueError(f"a captured training step runs on CUDA; {name} is on {t.device}: move the model and "
                                 "the batch to the GPU")
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (uncaptured steps before the capture), got {warmup!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no parameter that requires grad: nothing to train")
        dev = example_inputs.device
        off = [n for n, p in model.named_parameters() if p.requires_grad and p.device != dev]
        if off:
            raise ValueError(f"parameters {off[:3]}{' ...' if len(off) > 3 else ''} are not on {dev}, where the "
                             "example batch is: move the model to that device first")

        self.model, self.loss_fn, self.amp_dtype, self.scaler = model, loss_fn, amp_dtype, scaler
        self._params = params
        if donate_examples:  # the tensors themselves (detach() would hand back another tensor object)
            self._static_x, self._static_y = (t.detach() if t.requires_grad else t
                                              for t in (example_inputs, example_target))
        else:
            self._static_x, self._static_y = example_inputs.detach().clone(), example_target.detach().clone()
        self._graph = torch.cuda.CUDAGraph()
        buffers = [b for b in model.buffers()]
        saved = [b.detach().clone() for b in buffers]
        try:
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._clear_grads()
                    self._body()
                # One more step with host synchronisation forbidden: a step that synchronises cannot be captured,
                # and a capture that fails part-way leaves torch's CUDA generator unusable in this process.
                self._clear_grads()
                mode = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    self._body()
                except RuntimeError as e:
                    if "synchroniz" not in str(e):
                        raise
                    raise RuntimeError(
                        f"the training step synchronises with the host, so it cannot be captured in a CUDA graph "
                        f"({e}). Typical causes: .item() or float() of a CUDA tensor, BatchNorm with momentum=None "
                        "(it reads its batch counter), boolean indexing, nonzero. Run that model without capture"
                    ) from e
                finally:
                    torch.cuda.set_sync_debug_mode(mode)
            torch.cuda.current_stream(dev).wait_stream(side)
            self._clear_grads()
            try:
                with torch.cuda.graph(self._graph):
                    self._loss = self._body()
            except RuntimeError as e:
                raise RuntimeError(f"capturing the training step in a CUDA graph failed: {e}") from e
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)
            torch.cuda.current_stream(dev).synchronize()
        # The gradients the replay writes: the tensors the captured backward left in .grad (None for a parameter
        # the loss does not reach).
        self._grads: List[Optional[torch.Tensor]] = [p.grad for p in params]

    def _clear_grads(self) -> None:
        for p in self._params:
            p.grad = None

    def _body(self) -> torch.Tensor:
        dev_type = self._static_x.device.type
        if self.amp_dtype is None:
            out = self.model(self._static_x)
        else:
            # cache_enabled=False: a cached weight cast made during capture would be reused by replays of a
            # graph whose weights the optimizer has since changed.
            with torch.autocast(dev_type, dtype=self.amp_dtype, cache_enabled=False):
                out = self.model(self._static_x)
        loss = self.loss_fn(out, self._static_y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a one-element tensor (a scalar loss)")
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    @property
    def inputs(self) -> torch.Tensor:
        """The input batch the graph reads (filled by each call; a loader may write into it directly)."""
        return self._static_x

    @property
    def target(self) -> torch.Tensor:
        """The target batch the graph reads."""
        return self._static_y

    def __call__(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        for name, t, s in (("inputs", inputs, self._static_x), ("target", target, self._static_y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.shape != s.shape or t.dtype != s.dtype or t.device != s.device:
                raise ValueError(f"this step was captured for {name} of {_describe(s)}, got {_describe(t)}: a CUDA "
                                 "graph replays fixed shapes; build one CapturedTrainStep per input shape")
        if inputs is not self._static_x:
            self._static_x.copy_(inputs)
        if target is not self._static_y:
            self._static_y.copy_(target)
        self._graph.replay()
        for p, g in zip(self._params, self._grads):
            if g is not None and p.grad is not g:
                p.grad = g
        return self._loss
