"""The public ops. Importing the package registers them with ``torch.library`` (``library.py``)."""
from sparsekern.ops import library  # noqa: F401  (registers torch.ops.sparsekern.*)
