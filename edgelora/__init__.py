"""edgelora: adapt a small language model to a task from a few examples, on the CPU.

The runtime side: onnxruntime, numpy, scipy, tokenizers, safetensors. Never torch.
"""
from .bundle import Bundle
from .errors import UserError
from .examples import Example, load_examples

__all__ = ["Bundle", "Example", "UserError", "adapt", "load_examples"]
__version__ = "0.1.0"


def adapt(*args, **kwargs):
    """`edgelora.search.adapt`: find LoRA weights for a task from a few examples."""
    from .search import adapt as _adapt
    return _adapt(*args, **kwargs)
