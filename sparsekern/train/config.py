"""RunConfig: everything that defines one training run, its validation, TOML I/O and run id.

A config comes from defaults, then a TOML file, then command-line flags (later wins). Every
field carries its help text in its metadata, so the CLI flags are generated from this one
place. The run id (and directory name) is derived from the fields that change what the run
computes; where the run happens (device, out_dir, threads, ...) is left out of it, so a run
can be resumed on another machine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from sparsekern._flags import field_kind
from sparsekern.errors import ConfigError
from sparsekern.stats.analyze import SELECTIVITY_MODES
from sparsekern.train.mechanism import check_supported
from sparsekern.train.optim import optimizer_names, regularizer_names  # plug-ins may add names

LR_SCHEDULES = ("constant", "step", "cosine")
# Options of the Split LBI optimizers, with their defaults. They are None (and left out of the
# run id) for every other optimizer, so adding them changed no existing run's id.
SLBI_OPTIMIZERS = ("slbi", "slbi-group")
SLBI_DEFAULTS = {"slbi_kappa": 1.0, "slbi_nu": 100.0}


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """One training run. Construct with keyword arguments; invalid values raise ConfigError."""

    # --- what is trained, on what
    model: str = _opt("basicnet", "model name (see sparsekern.models.list_models())")
    dataset: str = _opt("fashion-mnist", "dataset name (see sparsekern.data)")
    data_root: str | None = _opt(None, "dataset directory (default: the data module's search path)")
    width: float = _opt(1.0, "width multiplier of the model (the 'network size' knob)")
    augment: bool = _opt(False, "train-time data augmentation")
    num_train_samples: int | None = _opt(None, "use only the first N training samples")
    num_test_samples: int | None = _opt(None, "evaluate on only the first N test samples")
    # --- how it is trained
    optimizer: str = _opt("adam", "sgd | momentum | adam | adamax | adagrad | adadelta | rmsprop | slbi (Split LBI: "
                               "conv filters, Linear weights) | slbi-group (conv filters, Linear rows) | plug-ins")
    lr: float = _opt(1e-3, "initial learning rate lr_0")
    momentum: float = _opt(0.9, "momentum of the 'momentum' optimizer, and of the loss gradient in 'slbi*'")
    slbi_kappa: float | None = _opt(None, "Split LBI kappa: Gamma = kappa * Prox(V), W steps by kappa * lr "
                                          "(None: 1.0 with optimizer slbi*, unused otherwise)")
    slbi_nu: float | None = _opt(None, "Split LBI nu: coupling ||W - Gamma||^2 / (2 nu), typical 20..500 "
                                       "(None: 100.0 with optimizer slbi*, unused otherwise)")
    reg: str = _opt("l2", "regulariser: none | l2 (penalty in the gradient) | wd (decoupled decay) | plug-ins")
    reg_strength: float = _opt(5e-4, "regularisation strength lambda (stored as 0 when reg=none)")
    reg_bn: bool = _opt(True, "also regularise BatchNorm gamma/beta (the paper does)")
    batch_size: int = _opt(40, "mini-batch size: the samples of one optimizer step, over all ranks (the global batch; "
                               "each of R ranks trains on batch_size / R of them, its BatchNorm batch)")
    ranks: int | None = _opt(None, "data-parallel processes (None: 1); train() sets it from torchrun's WORLD_SIZE, "
                                   "and a run resumes only with as many")
    sync_bn: bool = _opt(False, "with several ranks, BatchNorm statistics over the global batch (SyncBatchNorm) "
                                "rather than per rank")
    epochs: int = _opt(40, "training epochs (ignored when --steps is set)")
    steps: int | None = _opt(None, "step budget; overrides --epochs")
    lr_schedule: str = _opt("constant", f"one of {', '.join(LR_SCHEDULES)}")
    lr_milestones: tuple[float, ...] = _opt((0.5, 0.75), "step schedule: fractions of the budget where lr is multiplied by lr_decay")
    lr_decay: float = _opt(0.1, "step schedule: factor applied at each milestone")
    seed: int = _opt(0, "random seed (weights, data order, augmentation)")
    # --- what is measured
    eval_every: int | None = _opt(None, "evaluate + checkpoint every N steps (default: once per epoch)")
    eval_batch_size: int = _opt(500, "batch size for evaluation and the final analysis")
    track_selectivity: bool = _opt(False, "also track per-feature selectivity during training (costs time)")
    log_mechanism: bool = _opt(False, "log per BN channel, at each eval point, the sizes of the regulariser's and the "
                                      "loss gradient's updates of gamma over the interval and its selectivity on the "
                                      "training stream (sparsekern.train.mechanism; implies track_selectivity's "
                                      "tracker)")
    selectivity: str = _opt("two-pass", "final analysis of selectivity: two-pass | exact | histogram | memmap | none")
    analyze_samples: int | None = _opt(None, "final analysis on the first N training samples (default: all)")
    # --- where it runs (not part of the run id)
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    out_dir: str = _opt("runs", "parent directory of the run directory")
    name: str | None = _opt(None, "run directory name (default: the run id)")
    threads: int | None = _opt(None, "torch.set_num_threads for this run (default: torch's)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name)))
        if self.reg == "none":
            self.reg_strength = 0.0  # a strength means nothing without a regulariser; keep ids canonical
        if self.ranks == 1:
            self.ranks = None  # one process: the run id of a config written before ranks existed
        for name, default in SLBI_DEFAULTS.items():  # likewise the Split LBI options for other optimizers
            if self.optimizer not in SLBI_OPTIMIZERS:
                setattr(self, name, None)
            elif getattr(self, name) is None:
                setattr(self, name, default)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        need(self.optimizer in optimizer_names(), "optimizer", f"expected one of {', '.join(optimizer_names())}")
        need(self.reg in regularizer_names(), "reg", f"expected one of {', '.join(regularizer_names())}")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"expected one of {', '.join(LR_SCHEDULES)}")
        need(self.selectivity in SELECTIVITY_MODES, "selectivity", f"expected one of {', '.join(SELECTIVITY_MODES)}")
        for name in ("lr", "width"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "must be a finite number > 0")
        need(math.isfinite(self.reg_strength) and self.reg_strength >= 0, "reg_strength", "must be >= 0")
        for name in SLBI_DEFAULTS:
            value = getattr(self, name)
            need(value is None or (math.isfinite(value) and value > 0), name, "must be a finite number > 0")
        need(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(0 < self.lr_decay <= 1, "lr_decay", "must be in (0, 1]")
        need(all(0 < m < 1 for m in self.lr_milestones), "lr_milestones", "each must be a fraction in (0, 1)")
        need(list(self.lr_milestones) == sorted(self.lr_milestones), "lr_milestones", "must be increasing")
        for name in ("batch_size", "epochs", "eval_batch_size"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("steps", "eval_every", "num_train_samples", "num_test_samples", "analyze_samples", "threads",
                     "ranks"):
            need(getattr(self, name) is None or getattr(self, name) >= 1, name, "must be >= 1 (or unset)")
        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.device == "auto" or self.device == "cpu" or self.device.split(":")[0] == "cuda",
             "device", "expected auto, cpu, cuda or cuda:N")
        if self.ranks is not None and self.batch_size % self.ranks:
            raise ConfigError(f"batch_size={self.batch_size}: the global batch must split evenly between "
                              f"ranks={self.ranks} (each rank trains on batch_size / ranks samples)")
        if self.log_mechanism:
            check_supported(self.optimizer, self.reg)
        if self.reg != "none" and self.reg_strength == 0:
            raise ConfigError(f"reg_strength=0.0: must be > 0 when reg={self.reg!r} (use reg='none')")
        if self.name is not None:
            need(self.name not in ("", ".", "..") and "/" not in self.name and "\\" not in self.name,
                 "name", "must be a plain directory name")

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        """Plain JSON/TOML-friendly dict (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> "RunConfig":
        """Build from a dict; unknown keys raise ConfigError naming them and ``source``."""
        unknown = sorted(set(values) - set(FIELD_NAMES))
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELD_NAMES)}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path, overrides: dict | None = None) -> "RunConfig":
        """Load a flat TOML file (or one whose fields are all under a [run] table), then apply ``overrides``.

        Any other table, and keys beside a [run] table, raise ConfigError naming them: they
        would otherwise be ignored, and a setting put in the wrong place silently not applied.
        """
        values = load_toml(path)
        if isinstance(values.get("run"), dict):
            outside = [k for k in values if k != "run"]
            if outside:
                raise ConfigError(f"{path}: {_toml_key(outside[0], values)} is outside the [run] table; a run config "
                                  "is flat, or has all of its fields under [run]")
            values = values["run"]
        tables = [k for k, v in values.items() if isinstance(v, dict)]
        if tables:
            raise ConfigError(f"{path}: unknown table [{tables[0]}]; a run config has no tables but an optional [run] "
                              f"(its fields: {', '.join(FIELD_NAMES)})")
        return cls.from_dict({**values, **(overrides or {})}, source=str(path))

    def to_toml(self) -> str:
        """TOML text that ``from_toml`` reads back to an equal config (unset fields are omitted)."""
        return dumps_toml(self.to_dict())

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict:
        """The fields that determine what the run computes (the run id is derived from these).

        Unset optimizer options (the Split LBI ones of another optimizer), ``ranks`` of a single
        process and ``sync_bn=False`` are left out, so run ids written before those options
        existed stay valid."""
        return {k: v for k, v in self.to_dict().items()
                if k not in NOT_IDENTITY and not (k in _UNSET_IDENTITY and v == _UNSET_IDENTITY[k])}

    @property
    def rank_batch_size(self) -> int:
        """The samples each rank trains on per step (its BatchNorm batch): batch_size / ranks."""
        return self.batch_size // (self.ranks or 1)

    def config_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def run_id(self) -> str:
        """Readable and stable: ``basicnet-w0.5_fashion-mnist_adam-lr0.001_l2-0.0005_b40_k5000_s0_<hash>``."""
        budget = f"k{self.steps}" if self.steps is not None else f"e{self.epochs}"
        reg = "none" if self.reg == "none" else f"{self.reg}-{self.reg_strength:g}"
        batch = f"b{self.batch_size}" + (f"r{self.ranks}" if self.ranks else "")
        return (f"{self.model}-w{self.width:g}_{self.dataset}_{self.optimizer}-lr{self.lr:g}_{reg}"
                f"_{batch}_{budget}_s{self.seed}_{self.config_hash()[:8]}")

    def run_dir(self) -> Path:
        return Path(self.out_dir) / (self.name or self.run_id())


# Fields that say where/how a run executes, not what it computes.
NOT_IDENTITY = frozenset({"data_root", "device", "out_dir", "name", "threads", "eval_batch_size"})

# Fields left out of the identity while they have this value (options added after runs existed).
_UNSET_IDENTITY = {**{name: None for name in SLBI_DEFAULTS}, "ranks": None, "sync_bn": False,
                   "log_mechanism": False}

FIELD_NAMES = tuple(f.name for f in dataclasses.fields(RunConfig))


def config_fields() -> list[dataclasses.Field]:
    """The RunConfig fields, in declaration order."""
    return list(dataclasses.fields(RunConfig))


def _coerce(name: str, value):
    """Check one value against its annotation; ints are accepted for floats (TOML writes 1 not 1.0)."""
    kind = field_kind(RunConfig, name)
    base, optional = kind.base, kind.optional
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must be set (got None)")
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    elif base is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return tuple(float(v) for v in value)
    raise ConfigError(f"{name}={value!r}: expected {getattr(base, '__name__', base)}"
                      f"{' or None' if optional else ''}, got {type(value).__name__}")


def _toml_key(key: str, values: dict) -> str:
    """How an error names a top-level TOML key: ``[table]`` or ``key``."""
    return f"[{key}]" if isinstance(values[key], dict) else repr(key)


def check_data_root(data_root, source: str) -> None:
    """ConfigError unless ``data_root`` is None (the default search) or an existing directory.

    Called where a config is loaded to be run (the CLI), not by RunConfig itself: the config.toml
    of a finished run may name another machine's folder and is still read to analyse the run.
    """
    if data_root is not None and not Path(data_root).expanduser().is_dir():
        raise ConfigError(f"{source}: data_root={str(data_root)!r} is not an existing directory "
                          "(leave it unset to search $SPARSEKERN_DATA and the default places)")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def load_toml(path) -> dict:
    """Read a TOML file, with an error that names the file on a syntax error."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11: the same parser as the tomli package
        import tomli as tomllib
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # repr round-trips floats exactly and is valid TOML (1e-05, 0.001)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps_toml(values: dict, tables: dict | None = None) -> str:
    """Minimal TOML writer for flat scalar/list values (None is omitted: TOML has no null)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    for table, entries in (tables or {}).items():
        lines += ["", f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in entries.items() if v is not None]
    return "\n".join(lines) + "\n"
