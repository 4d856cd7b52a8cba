"""Models from elsewhere: torchvision, timm or any factory, with an optional local weights file.

    from sparsekern.models.external import load_external
    ext = load_external("timm:resnet18", "num_classes=10", weights="resnet18.safetensors")
    ext.model, ext.input_size, ext.mean, ext.std     # (C, H, W) and normalisation the model expects

Specs (``--model`` on the command line):

- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, **args)``.
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **args)`` (timm is optional:
  ``pip install sparsekern[timm]``).
- ``package.module:factory``: ``factory(**args)`` from the imported module (``factory`` may be a
  dotted attribute path, e.g. ``mypkg.nets:Builders.small``); it must return an ``nn.Module``.

``args`` (``--model-args``) is ``key=value,...`` with Python literals as values
(``num_classes=10,widths=(8, 16)``; a bare word is a string: ``act_layer=relu``). Nothing is ever
downloaded: ``pretrained=True`` / ``weights=...`` in the arguments is refused (pass ``--weights``).

Weights (``--weights``): a local file read without unpickling anything, ``.safetensors`` with
``safetensors.torch.load_file`` and ``.pth`` / ``.pt`` / ``.bin`` with
``torch.load(weights_only=True)``. The file holds a state dict, or a dict with one under
``state_dict``, ``model`` or ``model_state`` (a training checkpoint); a ``module.`` (DataParallel)
or ``_orig_mod.`` (torch.compile) prefix on every key is removed. Loading is strict: a
:class:`~sparsekern.errors.WeightsError` lists a few missing and unexpected keys and the shape
mismatches (BatchNorm's ``num_batches_tracked`` counters may be absent).

Input (what the data must look like): timm's data config of the model where timm has one
(``pretrained_cfg``: input size, mean / std, interpolation, crop_pct), else the input channels of
the first conv, 224 x 224, ImageNet mean / std, bilinear, crop_pct 0.875.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from sparsekern.errors import MissingDependencyError, ModelSpecError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
DEFAULT_CROP_PCT = 0.875
SOURCES = ("torchvision", "timm")
SPEC_FORMS = "torchvision:NAME, timm:NAME or package.module:factory"
STATE_DICT_KEYS = ("state_dict", "model", "model_state")  # where a checkpoint keeps its state dict
KEY_PREFIXES = ("module.", "_orig_mod.")                   # DataParallel, torch.compile
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SHOWN = 5  # keys listed per kind in a mismatch error


@dataclass
class ExternalModel:
    """A built model with where it came from and the input it expects (``input_size`` is (C, H, W))."""

    model: nn.Module
    spec: str
    model_args: Dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None
    input_size: Tuple[int, int, int] = (3, DEFAULT_SIZE, DEFAULT_SIZE)
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = DEFAULT_CROP_PCT
    data_config: str = "default"  # "timm" when the input came from timm's data config

    @property
    def in_channels(self) -> int:
        return self.input_size[0]

    def describe(self) -> dict:
        """JSON-able: how to build it again (:func:`load_external` of these fields) and its input."""
        return {"spec": self.spec, "model_args": format_model_args(self.model_args), "weights": self.weights,
                "input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct, "data_config": self.data_config}


# ---------------------------------------------------------------------- --model-args
def parse_model_args(text: Optional[str]) -> Dict[str, Any]:
    """``"num_classes=10,widths=(8, 16),act_layer=relu"`` -> a dict of Python literals (a bare name is
    a string). Empty or None gives {}. A malformed text is a ModelSpecError naming the bad part."""
    if text is None or not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        raise ModelSpecError(f"--model-args {text!r}: expected key=value,... with Python literals as values "
                             "(e.g. num_classes=10,drop_rate=0.1)") from None
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise ModelSpecError(f"--model-args {text!r}: every item must be key=value (e.g. num_classes=10)")
    args = {}
    for keyword in call.keywords:
        value = keyword.value
        if isinstance(value, ast.Name):
            args[keyword.arg] = value.id
            continue
        try:
            args[keyword.arg] = ast.literal_eval(value)
        except ValueError:
            raise ModelSpecError(f"--model-args {text!r}: the value of {keyword.arg} "
                                 f"({ast.get_source_segment(f'f({text})', value)}) is not a Python literal") from None
    return args


def format_model_args(args: Dict[str, Any]) -> str:
    """The inverse of :func:`parse_model_args` (``repr`` of each value)."""
    return ",".join(f"{key}={value!r}" for key, value in args.items())


# ---------------------------------------------------------------------- building
def build_external(spec: str, model_args: Union[None, str, Dict[str, Any]] = None) -> nn.Module:
    """The model ``spec`` names (see the module docstring), randomly initialised, in eval mode."""
    args = parse_model_args(model_args) if model_args is None or isinstance(model_args, str) else dict(model_args)
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise ModelSpecError(f"model spec {spec!r}: expected {SPEC_FORMS}")
    for refused in ("pretrained", "weights", "pretrained_cfg_overlay", "checkpoint_path"):
        if args.get(refused) not in (None, False):
            raise ModelSpecError(f"model spec {spec!r}: --model-args {refused}=... would load or download weights; "
                                 "nothing is downloaded here: pass a local file with --weights")
    if source == "torchvision":
        model = _torchvision(spec, name, args)
    elif source == "timm":
        model = _timm(spec, name, args)
    else:
        model = _factory(spec, source, name, args)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _call(spec: str, builder, *args, fixed: Optional[dict] = None, **kwargs) -> nn.Module:
    """``builder(*args, **fixed, **kwargs)``; a TypeError / ValueError (an unknown or bad keyword
    argument) is a ModelSpecError naming the spec and the user's arguments ``kwargs``."""
    try:
        return builder(*args, **(fixed or {}), **kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelSpecError(f"model spec {spec!r} with --model-args {format_model_args(kwargs) or '(none)'}: "
                             f"{type(exc).__name__}: {_first_line(exc)}") from None


def _unknown(spec: str, name: str, known: List[str], where: str) -> ModelSpecError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ModelSpecError(f"model spec {spec!r}: {where} has no model {name!r}{hint}")


def _torchvision(spec: str, name: str, args: dict) -> nn.Module:
    import torchvision.models

    known = sorted(torchvision.models.list_models())
    if name not in known:
        raise _unknown(spec, name, known, "torchvision")
    args.pop("weights", None)
    return _call(spec, torchvision.models.get_model, name, fixed={"weights": None}, **args)


def import_timm():
    """timm, or a MissingDependencyError saying how to install it."""
    try:
        import timm
    except ImportError:
        raise MissingDependencyError("timm models need timm, which is not installed: "
                                     "pip install 'sparsekern[timm]'") from None
    return timm


def _timm(spec: str, name: str, args: dict) -> nn.Module:
    timm = import_timm()
    if not timm.is_model(name):
        raise _unknown(spec, name, timm.list_models(), "timm")
    args.pop("pretrained", None)
    return _call(spec, timm.create_model, name, fixed={"pretrained": False}, **args)


def _factory(spec: str, module_name: str, attribute: str, args: dict) -> nn.Module:
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"model spec {spec!r}: cannot import module {module_name!r} ({exc}); expected "
                             f"{SPEC_FORMS}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelSpecError(f"model spec {spec!r}: {getattr(target, '__name__', module_name)} has no "
                                 f"attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelSpecError(f"model spec {spec!r}: {attribute} is a {type(target).__name__}, not a callable factory")
    return _call(spec, target, **args)


# ---------------------------------------------------------------------- weights
def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The state dict in a local weights file (see the module docstring), on the CPU, without
    unpickling any Python object. Every problem is a WeightsError naming the file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist")
    if not path.is_file():
        raise WeightsError(f"weights file {path} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        content = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        content = _read_torch(path)
    else:
        raise WeightsError(f"weights file {path}: unknown format {suffix or '(no suffix)'!r}; expected "
                           f"{', '.join(TORCH_SUFFIXES)} (torch.save of a state dict) or .safetensors")
    return _strip_prefixes(_find_state_dict(content, path))


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise MissingDependencyError(f"{path}: reading .safetensors needs safetensors, which is not installed: "
                                     "pip install 'sparsekern[timm]' (or pip install safetensors)") from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"weights file {path}: not a readable safetensors file ({_first_line(exc)})") from None


def _read_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"weights file {path} holds pickled Python objects, not only tensors, and is not loaded "
            f"(torch.load(weights_only=True) refused it: {_unpickling_reason(exc)}); save the weights with "
            "torch.save(model.state_dict(), path) or safetensors.torch.save_file") from None
    except Exception as exc:  # the unpickler meets garbage in many ways (EOFError, IndexError, RuntimeError...)
        raise WeightsError(f"weights file {path}: not a readable torch.save file "
                           f"({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _unpickling_reason(exc: BaseException) -> str:
    """The line of torch's long weights-only message that says what it met (e.g. a global)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.rstrip(".")
    return lines[0] if lines else type(exc).__name__


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _find_state_dict(content: Any, path: Path) -> Dict[str, torch.Tensor]:
    if _is_state_dict(content):
        return dict(content)
    if isinstance(content, dict):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(content.get(key)):
                return dict(content[key])
        keys = ", ".join(repr(k) for k in list(content)[:8]) or "none"
        raise WeightsError(f"weights file {path} holds a dict with no state dict in it (top-level keys: {keys}); "
                           f"expected name -> tensor, or one under {' / '.join(map(repr, STATE_DICT_KEYS))}")
    raise WeightsError(f"weights file {path} holds a {type(content).__name__}, not a state dict (name -> tensor)")


def _strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in KEY_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _listing(keys: List[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (f", ... ({len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


def load_weights(model: nn.Module, state: Dict[str, torch.Tensor], source: str = "the weights") -> nn.Module:
    """``model.load_state_dict(state)``, strictly; a mismatch is one WeightsError listing a few missing
    and unexpected keys and the shape mismatches (``source`` names the file in it)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched)}")
    if problems:
        raise WeightsError(f"{source} does not fit the model ({type(model).__name__}): " + "; ".join(problems))
    filled = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state}
    model.load_state_dict(filled, strict=True)
    return model


# ---------------------------------------------------------------------- the input a model expects
def first_conv_channels(model: nn.Module, default: int = 3) -> int:
    """Input channels of the first Conv2d in module order (the stem of every usual CNN)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else default


def _timm_data_config(model: nn.Module) -> Optional[dict]:
    """timm's data config when the model carries a timm ``pretrained_cfg`` (and timm is installed)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not isinstance(cfg, dict) or "input_size" not in cfg:
        return None
    try:
        from timm.data import resolve_model_data_config
    except ImportError:
        return None
    return resolve_model_data_config(model)


def input_config(model: nn.Module, input_size: Optional[Union[int, Tuple[int, int]]] = None) -> dict:
    """{"input_size": (C, H, W), "mean", "std", "interpolation", "crop_pct", "data_config"} for
    ``model`` (see the module docstring); ``input_size`` (H or (H, W)) overrides the spatial size."""
    timm_cfg = _timm_data_config(model)
    if timm_cfg is not None:
        channels, height, width = (int(v) for v in timm_cfg["input_size"])
        config = {"mean": tuple(float(v) for v in timm_cfg["mean"]), "std": tuple(float(v) for v in timm_cfg["std"]),
                  "interpolation": str(timm_cfg.get("interpolation") or "bilinear"),
                  "crop_pct": float(timm_cfg.get("crop_pct") or DEFAULT_CROP_PCT), "data_config": "timm"}
    else:
        channels, height, width = first_conv_channels(model), DEFAULT_SIZE, DEFAULT_SIZE
        config = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear",
                  "crop_pct": DEFAULT_CROP_PCT, "data_config": "default"}
    if input_size is not None:
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if height < 1 or width < 1:
            raise ModelSpecError(f"input size must be positive, got {input_size!r}")
    config["input_size"] = (channels, int(height), int(width))
    return config


def load_external(spec: str, model_args: Union[None, str, Dict[str, Any]] = None,
                  weights: Optional[Union[str, Path]] = None,
                  input_size: Optional[Union[int, Tuple[int, int]]] = None) -> ExternalModel:
    """Build ``spec`` with ``model_args``, load ``weights`` (strictly; random initialisation without),
    and work out its input (:func:`input_config`). The model is on the CPU, in eval mode."""
    args = parse_model_args(model_args) if model_args is None or isinstance(model_args, str) else dict(model_args)
    model = build_external(spec, dict(args))
    if weights is not None:
        state = read_state_dict(weights)
        load_weights(model, state, f"weights file {Path(weights).expanduser()}")
    config = input_config(model, input_size)
    return ExternalModel(model=model.eval(), spec=spec, model_args=args,
                         weights=None if weights is None else str(Path(weights).expanduser().resolve()), **config)
