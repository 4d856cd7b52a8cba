"""Every error sparsekern raises on purpose, in one place (the lowest layer: imports nothing of the package).

Each is a ``SparsekernError`` and also subclasses the builtin it refines (``ValueError`` for bad
input, ``RuntimeError`` for a state the program cannot go on from), so ``except ValueError`` keeps
working for callers that do not know this module. The message of each names the problem: the
command line prints it as one line (``sparsekern.cli``), without the exception's type.
"""
from __future__ import annotations


class SparsekernError(Exception):
    """Base class: an error whose message says what went wrong and, where it can, what to do."""


# ---------------------------------------------------------------------- input and configuration
class ConfigError(SparsekernError, ValueError):
    """A configuration value is invalid; the message names the field."""


class ManifestError(SparsekernError, ValueError):
    """A prune plan manifest that cannot be used; the message names the file and the JSON path of the bad field."""


class StateDictError(SparsekernError, ValueError):
    """A ChannelStats or SparsityTracker state dict that is malformed or inconsistent."""


class CorpusChangedError(SparsekernError, ValueError):
    """The second pass of a two-pass analysis did not see the batches of the first."""


class NonFiniteActivationError(SparsekernError, ValueError):
    """Some channels saw NaN (or Inf) activations; a metric cannot call them dead or active.

    ``channels`` lists every offending channel index, ``nan_samples`` / ``inf_samples`` the
    number of samples in which each of them saw NaN / Inf.
    """

    def __init__(self, message: str, channels: list[int], nan_samples: list[int], inf_samples: list[int]):
        super().__init__(message)
        self.channels = channels
        self.nan_samples = nan_samples
        self.inf_samples = inf_samples


# ---------------------------------------------------------------------- kernels
class BackendUnavailableError(SparsekernError, RuntimeError):
    """An explicitly requested backend cannot run this call."""


class CpuIsaError(SparsekernError, ValueError):
    """SPARSEKERN_CPU_ISA names a CPU kernel variant that this build or this CPU cannot run."""


# ---------------------------------------------------------------------- pruning
class UnsupportedModelError(SparsekernError, RuntimeError):
    """The model contains an op the channel analysis cannot map; the model was not changed."""


class UntraceableModelError(UnsupportedModelError):
    """torch.fx cannot trace the model; the message says which module or call failed and what to do
    (declare it a leaf module with ``leaf_modules=``, or fix the Python control flow with ``concrete_args``)."""


class PruneVerificationError(SparsekernError, RuntimeError):
    """The pruned model's outputs differ from the reference beyond tolerance; nothing was changed."""

    def __init__(self, message: str, max_abs_diff: float, tolerance: float):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance


# ---------------------------------------------------------------------- runs
class CheckpointError(SparsekernError, RuntimeError):
    """A checkpoint exists but cannot be used (unreadable, corrupt, or of another config or schedule)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is unreadable or fails its checksum (the previous one may still be good)."""


class RunLockedError(CheckpointError):
    """Another live process holds the run directory's lock (it is training that run)."""


class TrainingDivergedError(SparsekernError, RuntimeError):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------- models, weights and data from elsewhere
class MissingDependencyError(SparsekernError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


class ModelSpecError(SparsekernError, ValueError):
    """A model spec (``--model``, ``--model-args``) that builds no model: an unknown source, name or
    factory, arguments the factory refuses, or a factory that returns no ``nn.Module``."""


class WeightsError(SparsekernError, ValueError):
    """A weights file that cannot be used: missing, of an unknown format, holding pickled Python
    objects instead of tensors only, holding no state dict, or not fitting the model (the message
    lists missing / unexpected keys and shape mismatches)."""


class DataError(SparsekernError, ValueError):
    """A corpus that cannot be used: an unknown ``--data`` spec, an image folder with no images in
    it, or an image file that cannot be read (the message names the folder or file)."""
