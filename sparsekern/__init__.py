"""sparsekern: measure and harvest filter-level sparsity in convolutional networks.

    import sparsekern
    m = sparsekern.channel_absmax(x)           # (N, C) max |x| per sample and channel
    stats = sparsekern.ChannelStats()           # streaming corpus statistics for one layer
    stats.update(x); stats.dead_mask(); stats.selectivity()

Nothing here touches a CUDA driver at import time; without the compiled extension every op
falls back to its pure-torch reference (with one warning). ``sparsekern.backends()`` says
what is available.
"""
from sparsekern._backend import backends
from sparsekern._denormals import configure_from_environment as _configure_denormals
from sparsekern.errors import BackendUnavailableError, NonFiniteActivationError
from sparsekern.ops.channel_absmax import channel_absmax, channel_absmax_reference

__version__ = "0.1.0"

_configure_denormals()  # before torch's worker threads exist: see sparsekern/_denormals.py


def __getattr__(name):
    # Heavier pieces load on first use so `import sparsekern` stays cheap in a training loop.
    lazy = {
        "ChannelStats": ("sparsekern.stats.channel_stats", "ChannelStats"),
        "SparsityTracker": ("sparsekern.stats.tracker", "SparsityTracker"),
        "analyze": ("sparsekern.stats.analyze", "analyze"),
        "bn_relu": ("sparsekern.ops.bn_relu", "bn_relu"),
        "bn_relu_reference": ("sparsekern.ops.bn_relu", "bn_relu_reference"),
        "bn_affine": ("sparsekern.ops.bn_relu", "bn_affine"),
        "FusedBNReLU": ("sparsekern.ops.bn_relu", "FusedBNReLU"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparsekern' has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "backends",
    "channel_absmax",
    "channel_absmax_reference",
    "ChannelStats",
    "NonFiniteActivationError",
    "SparsityTracker",
    "analyze",
    "bn_relu",
    "bn_relu_reference",
    "bn_affine",
    "FusedBNReLU",
]
