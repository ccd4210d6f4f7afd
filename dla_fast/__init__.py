"""dla_fast: timm's Deep Layer Aggregation models with fused Triton / CUDA inference kernels.

    import dla_fast
    model = dla_fast.create_model("dla34", pretrained="dla34.safetensors").eval()
    fast = dla_fast.optimize(model, dtype=torch.float16)   # BN folded, fused kernels, channels_last
    y = fast(x.cuda())
"""
from .version import __version__
from . import ops
from .models import CheckpointError, create_model, from_timm, list_models
from .fuse import fold_bn, optimize
from .plan import tune

__all__ = ["__version__", "create_model", "list_models", "from_timm", "optimize", "fold_bn", "tune", "ops",
           "CheckpointError"]
