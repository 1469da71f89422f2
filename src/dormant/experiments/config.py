"""ExperimentConfig: the single source of truth for a run (CLI flags derive from it)."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from ..activations import ACTIVATIONS, make_activation
from ..criteria import CRITERIA
from ..data import DATASETS
from ..methods import METHODS
from ..models import INITS, MODELS
from ..schedules import SCHEDULES
from ..train.loop import COMPILE_MODES, MEMORY_FORMATS, OPTIMIZERS, PRECISIONS

_MAPPINGS = ("model_args", "method_args", "dataset_args", "schedule_args", "activation_args",
             "init_args", "tasks")


class ConfigError(ValueError):
    """An invalid configuration, refused before anything runs."""


@dataclass(frozen=True)
class ExperimentConfig:
    """One training run. A new option's default must change nothing (hashes stay valid)."""
    dataset: str = "mnist1d"
    model: str = "mlp"
    model_args: Mapping[str, Any] = field(default_factory=dict)
    activation: str = "relu"
    activation_args: Mapping[str, Any] = field(default_factory=dict)
    init: str = "default"          # "eoc": edge-of-chaos init for the activation's sparsity
    init_args: Mapping[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"     # learning-rate schedule, stepped per epoch
    schedule_args: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    val_size: int = -1             # -1: the dataset's default
    dataset_args: Mapping[str, Any] = field(default_factory=dict)
    method: str = "none"
    method_args: Mapping[str, Any] = field(default_factory=dict)
    monitor_every: int = 10        # watch every k-th training step (probes are always exact)
    eps: float = 0.0               # an output counts as active when > eps
    criterion: str = "never_active"
    device: str = "cpu"
    precision: str = "fp32"        # fp32, or bf16: training forwards under bf16 autocast
    memory_format: str = "contiguous"   # or channels_last: 4-d activations in NHWC
    compile: str = "off"           # or a torch.compile mode for the training forward
    # continual learning: {kind: permuted | random-labels, epochs_per_task, samples, seed};
    # empty: one task (dormant.data.tasks)
    tasks: Mapping[str, Any] = field(default_factory=dict)

    # -- checks --------------------------------------------------------------------------
    def validate(self) -> "ExperimentConfig":
        """Refuse unknown names and invalid values; returns self."""
        for value, reg in ((self.dataset, DATASETS), (self.model, MODELS),
                           (self.activation, ACTIVATIONS), (self.optimizer, OPTIMIZERS),
                           (self.method, METHODS), (self.criterion, CRITERIA),
                           (self.schedule, SCHEDULES), (self.init, INITS)):
            if value not in reg:
                raise ConfigError(f"unknown {reg.kind} {value!r}; valid {reg.plural}: "
                                  f"{', '.join(reg.names())}")
        finite = all(math.isfinite(v) for v in (self.lr, self.momentum, self.weight_decay,
                                                 self.eps))
        checks = [
            (finite, "lr, momentum, weight_decay and eps must be finite numbers, got "
                     f"{self.lr}, {self.momentum}, {self.weight_decay}, {self.eps}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.val_size >= 1 or self.val_size == -1,
             f"val_size must be >= 1 (the monitor and the methods probe the validation split), "
             f"or -1 for the dataset's default; got {self.val_size}"),
            (self.monitor_every >= 1, f"monitor_every must be >= 1, got {self.monitor_every}"),
            (self.eps >= 0, f"eps must be >= 0, got {self.eps}"),
            (self.device == "cpu" or self.device.startswith(("cuda", "mps")),
             f"device must be cpu, cuda[:N] or mps, got {self.device!r}"),
            (0 <= self.seed < 2 ** 63, f"seed must be an integer in [0, 2**63), got {self.seed}"),
            (self.precision in PRECISIONS,
             f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.memory_format in MEMORY_FORMATS, f"memory_format must be one of "
             f"{', '.join(MEMORY_FORMATS)}, got {self.memory_format!r}"),
            (self.compile in COMPILE_MODES, f"compile must be one of "
             f"{', '.join(COMPILE_MODES)}, got {self.compile!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        problem = _device_problem(self.device)
        if problem:
            raise ConfigError(f"device {self.device!r}: {problem}")
        self._check_options()
        return self

    def _check_options(self) -> None:
        """Model/schedule option names and method options (built once, cheaply) are checked
        here, so a comparison fails before its first run trains, not in its fifth."""
        from ..methods import from_options
        _check_names("model", self.model, MODELS.get(self.model), self.model_args, skip=3)
        _check_names("schedule", self.schedule, SCHEDULES.get(self.schedule),
                     self.schedule_args, skip=1)
        _check_names("init", self.init, INITS.get(self.init), self.init_args, skip=3)
        _check_names("dataset", self.dataset, DATASETS.get(self.dataset), self.dataset_args,
                     skip=1)
        from ..data.base import check_sizes
        try:
            check_sizes(self.dataset, self.dataset_args)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _check_names("activation", self.activation, ACTIVATIONS.get(self.activation),
                     self.activation_args, skip=0)
        try:
            if self.tasks:
                from ..data.tasks import TaskSchedule
                try:
                    schedule = TaskSchedule(**self.tasks)
                except TypeError:
                    raise ValueError(f"tasks: unknown key(s) in {dict(self.tasks)}; valid: kind, "
                                     "epochs_per_task, samples, seed") from None
                if self.epochs % schedule.epochs_per_task:
                    raise ValueError(f"tasks: epochs ({self.epochs}) must be a multiple of "
                                     f"epochs_per_task ({schedule.epochs_per_task})")
            SCHEDULES.get(self.schedule)(self.epochs, **self.schedule_args)
            make_activation(self.activation, **self.activation_args)
            if self.init == "eoc":
                self._check_eoc()
            method = from_options(self.method, self.method_options())
            if method is not None:
                method.check_budget(epochs=self.epochs)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None

    def _check_eoc(self) -> None:
        from .. import eoc
        a = dict(self.init_args)
        if self.activation == "relu":
            return
        if self.activation not in eoc.KINDS:
            raise ValueError(f"eoc init needs activation relu, {', '.join(eoc.KINDS)}; "
                             f"got {self.activation!r}")
        eoc.prescribe(self.activation, a.get("sparsity", 0.85), a.get("q_star", 1.0),
                      a.get("v_prime"))

    def method_options(self):
        """The method's options, parsed (converted and checked) once per config: validation
        and the run build the method from them (`dormant.methods.from_options`)."""
        from ..methods import parse_options
        key = json.dumps(dict(self.method_args), sort_keys=True, default=repr)
        cached = self.__dict__.get("_parsed_method")
        if cached is None or cached[0] != (self.method, key):
            cached = ((self.method, key), parse_options(self.method, **self.method_args))
            object.__setattr__(self, "_parsed_method", cached)
        return cached[1]

    # -- identity ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        for k in _MAPPINGS:
            d[k] = dict(d[k])
        return d

    def digest(self) -> str:
        """Hash of the fields that differ from their defaults (the device excluded): adding an
        option with a default leaves every existing run's name unchanged."""
        defaults = ExperimentConfig().to_dict()
        d = {k: v for k, v in self.to_dict().items() if k != "device" and v != defaults[k]}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

    def label(self) -> str:
        m = "" if self.method == "none" else f"-{self.method}"
        return f"{self.dataset}-{self.model}{m}-s{self.seed}-{self.digest()}"

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExperimentConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {sorted(known)}")
        typed = {}
        for f in fields(cls):
            if f.name in d:
                typed[f.name] = _coerce(f.name, f.type, d[f.name])
        return cls(**typed)

    def override(self, **changes) -> "ExperimentConfig":
        merged = self.to_dict()
        for k, v in changes.items():
            if k in _MAPPINGS and isinstance(v, Mapping):
                merged[k] = {**merged[k], **v}
            else:
                merged[k] = v
        return ExperimentConfig.from_dict(merged)


def _check_names(kind: str, name: str, fn, options: Mapping[str, Any], skip: int) -> None:
    """Refuse option names `fn` does not take (its first `skip` parameters are positional)
    and values of the wrong type (where `fn` annotates its parameters)."""
    import inspect
    import typing

    from ..options import _article, _convert, describe_type
    if isinstance(fn, type):             # a class: its __init__ after self
        fn, skip = fn.__init__, skip + 1
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        valid = [p.name for p in params]
        bad = sorted(set(options) - set(valid))
        if bad:
            raise ConfigError(f"{kind} {name!r} has no option(s) {bad}; valid: {valid or 'none'}")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:    # unresolvable annotations: names were checked, types are not
        return
    for key, value in options.items():
        if key in hints:
            try:
                _convert(value, hints[key])
            except TypeError:
                raise ConfigError(f"{kind} {name!r}: {key}: expected "
                                  f"{_article(describe_type(hints[key]))}, got {value!r}") from None


def _coerce(name: str, typ: Any, value: Any) -> Any:
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if typ in ("float", "int") and isinstance(value, bool):
            raise ValueError
        if typ == "float":
            return float(value)
        if typ == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ == "str":
            return str(value)
        if typ.startswith("Mapping"):
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {typ}, got {value!r}") from None
    return value


def load_config_file(path: str) -> dict:
    """A YAML or JSON file as a dict."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON at line {err.lineno}, column "
                              f"{err.colno}: {err.msg}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        return data
    try:
        import yaml
    except ImportError:
        raise ConfigError("reading YAML needs PyYAML: pip install 'dormant[yaml]'") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _device_problem(device: str) -> str:
    """Why `device` cannot be used here ('' when it can)."""
    import torch
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine (use --device cpu)"
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            return (f"no such CUDA device (this machine has {torch.cuda.device_count()}: "
                    "cuda:0 ...)")
    if device == "mps" and not (torch.backends.mps.is_built() and torch.backends.mps.is_available()):
        return "this PyTorch has no usable mps (Apple GPU) support (use --device cpu)"
    if device.startswith("mps") and device != "mps":
        return "expected mps"
    return ""

