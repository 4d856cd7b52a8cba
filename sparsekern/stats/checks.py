"""Checks of what the statistics are given before they use it: the per-sample maxima of
``ChannelStats.update_reduced``, and a state dict (a field's type, dtype and shape, an invariant
over a tensor, the header of a ChannelStats state). Each failure is one line naming the argument
or field and, for a tensor, the first place where it does not hold."""
from __future__ import annotations

import torch

from sparsekern._layout import SUPPORTED_DTYPES
from sparsekern.errors import StateDictError


def state_count(sd: dict, key: str, where: str) -> int:
    """``sd[key]``, which must be a non-negative int (not a bool, not a float)."""
    value = sd[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateDictError(f"{where}: field {key!r} must be a non-negative int, got {value!r}")
    return value


def state_tensor(sd: dict, key: str, dtype: torch.dtype, shape: tuple, where: str) -> torch.Tensor:
    """``sd[key]``, which must be a tensor of exactly this dtype and shape."""
    value = sd[key]
    if isinstance(value, torch.Tensor) and value.dtype == dtype and tuple(value.shape) == shape:
        return value
    got = f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
    raise StateDictError(f"{where}: field {key!r} must be a {dtype} tensor of shape {shape}, got {got}")


def require(ok: torch.Tensor, where: str, what: str, values: torch.Tensor, label: str = "channel") -> None:
    """Raise StateDictError saying ``what`` unless all of ``ok`` holds, naming the first place
    where it does not (its index, called ``label``) and the value of ``values`` there."""
    if bool(ok.all()):
        return
    index = tuple((~ok).nonzero()[0].tolist())
    at = index[0] if len(index) == 1 else index
    raise StateDictError(f"{where}: {what}; not so at {label} {at} (value {values[index].item()!r}), "
                         f"{int((~ok).sum())} place(s) in all")


# The fields every ChannelStats state dict has, with statistics or without.
HEADER_FIELDS = ("format", "mode", "histogram_mantissa_bits", "num_channels", "num_samples", "elements",
                 "apoz_samples")


def check_header(sd, mode: str, bits: int, given_channels: int | None, where: str) -> tuple[int | None, int, int]:
    """(num_channels, num_samples, elements) of a ChannelStats state dict whose header fields are
    present, of their types and consistent, for stats of selectivity ``mode`` with ``bits``
    histogram mantissa bits, built for ``given_channels`` channels (None: any)."""
    if not isinstance(sd, dict) or sd.get("format") != 1:
        raise StateDictError(f"{where}: not a ChannelStats state dict (format 1)")
    missing = [key for key in HEADER_FIELDS if key not in sd]
    if missing:
        raise StateDictError(f"{where}: missing field(s) {missing}")
    if sd["mode"] != mode or sd["histogram_mantissa_bits"] != bits:
        raise StateDictError(
            f"{where}: state is for selectivity={sd['mode']!r} with {sd['histogram_mantissa_bits']} mantissa bits, "
            f"these stats use {mode!r} with {bits}"
        )
    n, elements, apoz_samples = (state_count(sd, k, where) for k in ("num_samples", "elements", "apoz_samples"))
    c = sd["num_channels"]
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
        raise StateDictError(f"{where}: field 'num_channels' must be a positive int or None, got {c!r}")
    if given_channels is not None and c is not None and c != given_channels:
        raise StateDictError(f"{where}: state has {c} channels, these stats were built for {given_channels}")
    if apoz_samples > n:
        raise StateDictError(f"{where}: field 'apoz_samples' ({apoz_samples}) must be <= num_samples ({n})")
    if apoz_samples == 0 and elements != 0:
        raise StateDictError(f"{where}: field 'elements' is {elements} but apoz_samples is 0 (no positions "
                             "counted)")
    return c, n, elements


def check_reduced(m, positive, elements_per_sample, where: str) -> None:
    """The arguments of ``update_reduced``: maxima (N, C) of a supported float dtype, and
    integer positive counts of the same shape and device with their positions per sample."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor of maxima, got {type(m).__name__}")
    if m.dim() != 2:
        raise ValueError(f"{where}: expected maxima of shape (N, C), got shape {tuple(m.shape)}")
    if m.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where}: maxima must be float32, float16 or bfloat16, got {m.dtype}")
    if (positive is None) != (elements_per_sample is None):
        raise ValueError(f"{where}: give both `positive` and `elements_per_sample` (for APoZ), or neither")
    if positive is None:
        return
    if not isinstance(positive, torch.Tensor):
        raise TypeError(f"{where}: positive must be a tensor, got {type(positive).__name__}")
    if positive.shape != m.shape:
        raise ValueError(f"{where}: positive has shape {tuple(positive.shape)}, maxima {tuple(m.shape)}")
    if positive.dtype.is_floating_point or positive.dtype.is_complex or positive.dtype == torch.bool:
        raise TypeError(f"{where}: positive must hold integer counts, got {positive.dtype}")
    if positive.device != m.device:
        raise ValueError(f"{where}: positive is on {positive.device}, maxima on {m.device}")
    eps = elements_per_sample
    if isinstance(eps, bool) or not isinstance(eps, int) or eps < 0:
        raise ValueError(f"{where}: elements_per_sample must be a non-negative int, got {eps!r}")
