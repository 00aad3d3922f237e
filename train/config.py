"""Typed dataclass configs for every training script: one mechanism for `--key=value`, YAML files and `--help`.

- `ConfigBase`: the mechanism. A subclass is a dataclass whose fields carry a comment each (that comment is the
  field's `--help` line); `from_args(argv)` reads `--config FILE.yaml` then `--key=value` / `--key value` overrides
  (dashes read as underscores; true/false keys may stand alone; values parsed as YAML scalars and checked against
  the field's type); `validate()` raises ValueError, one line naming the key. Class attributes say what a script
  adds: `RESUME_MAY_DIFFER` (keys a resumed run may change), `BARE_VALUES` (what a bare `--key` means, e.g.
  `--resume` = auto), `MODEL_KEYS` (BeitConfig keys are accepted too and go to `model`), `PRESETS` (named sets of
  defaults chosen with `--preset`, for configs whose preset is not the model's).
- `TrainConfig`: the fields every script shares (data, output, steps, batch, lr, seed, logging, device).
- `BeitTrainConfig`: what training a BEiT network adds (model preset + overrides, schedule, AdamW, checkpoints and
  resume, precision, DeepSpeed, torch.compile). `PretrainConfig` and `FinetuneConfig` extend it;
  the dVAE trainer's `TokenizerTrainConfig` extends `TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import (Any, ClassVar, Dict, FrozenSet, List, Optional, Type, TypeVar, Union, get_args, get_origin,
                    get_type_hints)

from beit_fast.config import BeitConfig, parse_options

__all__ = ["ConfigBase", "TrainConfig", "BeitTrainConfig", "MAX_SEED", "COMPILE_MODES", "type_ok", "max_workers",
           "machine_cores", "machine_text"]

MAX_SEED = 2**32  # numpy's legacy seed range; every RNG a run seeds accepts [0, 2**32)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
C = TypeVar("C", bound="ConfigBase")


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_memory() -> Optional[int]:
    """Physical memory in bytes (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


WORKER_MEMORY = 512 * 2**20  # what one worker process (a data-loader or study worker: torch imported) holds at least


def max_workers(per_core: int = 2) -> int:
    """The most worker processes this machine carries: `per_core` per core, and one per WORKER_MEMORY of RAM."""
    cap = per_core * machine_cores()
    mem = machine_memory()
    return max(1, min(cap, mem // WORKER_MEMORY) if mem else cap)


def machine_text() -> str:
    mem = machine_memory()
    return f"{machine_cores()} cores" + (f", {mem / 2**30:.0f} GiB" if mem else "")


# -- value types -------------------------------------------------------------------------------------------------------
def type_ok(value: Any, tp: Any) -> bool:
    """Does `value` fit the annotation `tp`? (bool is not an int; an int is a float.)"""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = get_origin(tp)
    if origin is Union:
        return any(type_ok(value, a) for a in get_args(tp))
    if origin is not None:
        tp = origin  # Dict[str, Any] -> dict
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is Union:
        return " or ".join(_describe(a) for a in get_args(tp))
    tp = get_origin(tp) or tp
    names = {bool: "true/false", int: "an int", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _accepts(tp: Any, kind: type) -> bool:
    if get_origin(tp) is Union:
        return any(_accepts(a, kind) for a in get_args(tp))
    return (get_origin(tp) or tp) is kind


def field_types(cls: type) -> Dict[str, Any]:
    try:
        return get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: no type checks rather than no run
        return {}


def check_types(where: str, values: Dict[str, Any], types: Dict[str, Any]) -> None:
    for name, value in values.items():
        tp = types.get(name, Any)
        if not type_ok(value, tp):
            raise ValueError(f"{where}{name}={value!r}: expects {_describe(tp)}, got {type(value).__name__}")


def coerce(where: str, name: str, value: Any, tp: Any, from_cli: bool) -> Any:
    """One config value to the type of its field, or ValueError naming it. Command-line values are
    strings, parsed as YAML scalars unless the field is a plain string; YAML-file values come parsed."""
    import yaml

    if from_cli and tp is not str:
        if value.strip().lower() in ("none", "null", "~") and _accepts(tp, type(None)):
            return None  # Optional fields (init_values, num_masking_patches)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if _accepts(tp, list) and not isinstance(parsed, (list, dict)) and parsed is not None:
            # --ratio-range 0.5,2.0; one item alone is a list of one (--variants beit)
            parsed = [yaml.safe_load(v) for v in parsed.split(",")] if isinstance(parsed, str) else [parsed]
        # a list only where the field is one (--ratio-range [0.5,2.0]); a mapping never (model keys go one by one)
        value = value if isinstance(parsed, dict) or (isinstance(parsed, list) and not _accepts(tp, list)) else parsed
    if isinstance(value, str) and _accepts(tp, float) and not _accepts(tp, str):
        try:  # YAML 1.1 reads "2e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if not type_ok(value, tp):
        raise ValueError(f"{where}{name} expects {_describe(tp)}, got {value!r}")
    if _accepts(tp, float) and not isinstance(value, bool) and isinstance(value, int):
        value = float(value)
    return value


def read_yaml(path: Path) -> Dict[str, Any]:
    """A YAML mapping of config keys, or one-line errors (missing file, bad YAML with its line, not a mapping)."""
    import yaml

    if not path.is_file():
        what = "config path is a directory" if path.is_dir() else "config file not found"
        raise FileNotFoundError(f"{what}: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}: invalid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the config file: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
    return loaded


# -- the mechanism -----------------------------------------------------------------------------------------------------
@dataclass
class ConfigBase:
    RESUME_MAY_DIFFER: ClassVar[FrozenSet[str]] = frozenset()
    BARE_VALUES: ClassVar[Dict[str, str]] = {}
    MODEL_KEYS: ClassVar[bool] = False
    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {}

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # float fields that may be infinite (every other float, and every float in a list or the model overrides, must
    # be finite: NaN never is a setting)
    MAY_BE_INFINITE: ClassVar[FrozenSet[str]] = frozenset()

    def validate(self) -> None:
        """Types of every field, then no NaN / infinite number anywhere (subclasses add their range checks after
        calling this)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        check_types("", values, field_types(type(self)))
        for name, value in values.items():
            where = "model." if name == "model" else ""
            items = value.items() if isinstance(value, dict) else [(name, value)]
            for key, v in items:
                key = f"{where}{key}"
                for x in v if isinstance(v, (list, tuple)) else [v]:
                    if isinstance(x, float) and not math.isfinite(x) and not (
                            math.isinf(x) and key in self.MAY_BE_INFINITE):
                        raise ValueError(f"{key}={v!r}: must be a finite number")

    def bad(self, name: str, why: str) -> None:
        raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

    def positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                self.bad(name, "must be positive")

    def non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value < 0:  # None: an optional key left to its derived default
                self.bad(name, "must be >= 0")

    @classmethod
    def from_args(cls: Type[C], args: List[str]) -> C:
        """`--config FILE.yaml` then `--key=value` / `--key value` overrides; with MODEL_KEYS, BeitConfig keys go
        to `model` (plain, or as `--model.key=value`). Unknown keys and values of the wrong type raise ValueError."""
        flags = {f.name: "true" for f in fields(cls) if f.type in (bool, "bool")}
        flags.update(cls.BARE_VALUES)
        # The deepspeed launcher appends --local_rank=N; the rank comes from the environment (LOCAL_RANK) instead.
        pairs = [(k, v) for k, v in parse_options(args, flags=flags) if k != "local_rank"]
        values: Dict[str, Any] = {}
        model: Dict[str, Any] = {}
        for k, v in pairs:
            if k == "config":
                path = Path(v)
                for key, value in read_yaml(path).items():
                    cls._take(f"{path}: ", key, value, False, values, model)
        for k, v in pairs:
            if k != "config":
                cls._take("--", k, v, True, values, model)
        preset = cls.PRESETS.get(values.get("preset", getattr(cls, "preset", None)), {}) if cls.PRESETS else {}
        if cls.PRESETS and "preset" in values and values["preset"] not in cls.PRESETS:
            raise ValueError(f"unknown preset {values['preset']!r}; choose from {sorted(cls.PRESETS)}")
        if cls.MODEL_KEYS:
            values["model"] = model
        cfg = cls(**{**preset, **values})
        cfg.validate()
        return cfg

    @classmethod
    def _take(cls, where: str, key: str, value: Any, from_cli: bool, values: Dict[str, Any],
              model: Dict[str, Any]) -> None:
        own, types = {f.name for f in fields(cls)}, field_types(cls)
        model_keys = {f.name for f in fields(BeitConfig)} - {"extra"} if cls.MODEL_KEYS else set()

        def model_value(where_m: str, k: str, v: Any) -> None:
            if k not in model_keys:
                why = " (free-form notes, not an override)" if k == "extra" else ""
                raise ValueError(f"unknown model key {where_m}{k}{why}; valid: {', '.join(sorted(model_keys))}")
            model[k] = coerce(where_m, k, v, field_types(BeitConfig).get(k, Any), from_cli)

        if cls.MODEL_KEYS and key == "model" and not from_cli:
            if value is None:
                return
            if not isinstance(value, dict):
                raise ValueError(f"{where}model expects a mapping of BeitConfig keys, got {value!r}")
            for mk, mv in value.items():
                model_value(f"{where}model.", mk, mv)
        elif cls.MODEL_KEYS and from_cli and key.startswith("model."):
            model_value("--model.", key[len("model."):], value)
        elif key in own and key != "model":
            values[key] = coerce(where, key, value, types.get(key, Any), from_cli)
        elif key in model_keys:
            model_value(where, key, value)
        elif from_cli:
            extra = ", model keys too" if cls.MODEL_KEYS else ""
            raise ValueError(f"unknown option --{key}; options: {sorted(own - {'model'})}{extra}")
        else:
            raise ValueError(f"{where}unknown config key {key!r}")

    @classmethod
    def field_comments(cls) -> Dict[str, str]:
        """The comment beside each field (and its continuation lines), for --help; a subclass's comment wins."""
        comments: Dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            if klass is object or not dataclasses.is_dataclass(klass):
                continue
            try:
                source = inspect.getsource(klass)
            except (OSError, TypeError):
                continue
            last = None
            for line in source.splitlines():
                m = re.match(r"\s{4}(\w+): [^#]*?#\s*(.*)$", line)
                if m:
                    last = m.group(1)
                    comments[last] = m.group(2)
                elif last and re.match(r"\s{4}#\s*", line):
                    comments[last] += " " + line.strip().lstrip("#").strip()
                elif not line.strip().startswith("#"):
                    last = None
        return comments

    @classmethod
    def help_text(cls, doc: str) -> str:
        """The script's docstring, then every option with its default and comment."""
        lines = [doc.rstrip(), "", "options (--key=value or --key value; true/false keys also stand alone"
                 + "".join(f", a bare --{k} means {v}" for k, v in cls.BARE_VALUES.items()) + "):"]
        comments = cls.field_comments()
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else \
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "{}"
            lines.append(f"  --{f.name.replace('_', '-')}  (default {default!r})  {comments.get(f.name, '')}".rstrip())
        if cls.PRESETS:
            lines.append(f"  presets: {', '.join(sorted(cls.PRESETS))}")
        lines.append("  --config FILE.yaml" + ("; any BeitConfig key (e.g. --depth=2 or --model.depth=2)"
                                               if cls.MODEL_KEYS else ""))
        return "\n".join(lines)


@dataclass
class TrainConfig(ConfigBase):
    data: str = "builtin"  # "builtin" (procedural shapes) or an image folder
    num_images: int = 4096  # size of the built-in dataset
    out: str = "runs/train"  # run directory: config.json, metrics.csv, checkpoints, summary.json
    max_steps: int = 300  # optimizer steps
    batch_size: int = 64  # images per optimizer step, over all processes and micro-batches (the global batch)
    lr: float = 1e-3  # peak learning rate
    seed: int = 0
    log_every: int = 10  # steps between log lines
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"

    def validate(self) -> None:
        super().validate()
        self.positive("max_steps", "batch_size", "log_every", "num_images")
        from beit_fast.data import MAX_BUILTIN_IMAGES

        if self.num_images > MAX_BUILTIN_IMAGES:
            self.bad("num_images", f"must be at most {MAX_BUILTIN_IMAGES:.0e}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):  # None: a recipe's, set later
            self.bad("lr", "must be a positive finite number")
        if not 0 <= self.seed < MAX_SEED:
            self.bad("seed", "must be in [0, 2**32)")
        for name in ("out", "data"):
            if not getattr(self, name).strip():
                self.bad(name, "must not be empty")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            self.bad("device", 'must be "auto", "cpu", "cuda" or "cuda:N"')


@dataclass
class BeitTrainConfig(TrainConfig):
    # Keys a resumed run may change; every other key must match the checkpoint's (the model config too).
    RESUME_MAY_DIFFER: ClassVar[FrozenSet[str]] = frozenset(
        {"max_steps", "out", "resume", "log_every", "save_every", "keep_last", "num_workers", "device",
         "max_bad_steps", "compile", "compile_mode", "tensorboard", "plot", "grad_accum_steps", "apex", "overwrite",
         "dist_timeout", "allow_changed_data"})
    BARE_VALUES: ClassVar[Dict[str, str]] = {"resume": "auto"}
    MODEL_KEYS: ClassVar[bool] = True

    preset: str = "tiny"  # BeitConfig preset: tiny | small | base | large
    model: Dict[str, Any] = field(default_factory=dict)  # BeitConfig overrides, e.g. {"depth": 2}
    grad_accum_steps: int = 1  # micro-batches per optimizer step and process
    min_lr: float = 1e-5  # end of the cosine
    warmup_steps: int = 30  # linear warmup from 0
    weight_decay: float = 0.05  # AdamW decay (not on 1-D params, ".bias" names, model.no_weight_decay(); as unilm)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 3.0  # max global grad norm (0 disables)
    num_workers: int = 1  # data-loader workers (0: load in the main process)
    save_every: int = 100  # steps between checkpoints (0: only at the end)
    keep_last: int = 2  # checkpoints kept
    resume: str = ""  # "" (fresh), "auto" (newest checkpoint in out/ if any) or a checkpoint path
    precision: str = "auto"  # "fp32", "bf16" (autocast on CUDA); "auto": bf16 on CUDA, fp32 on CPU
    max_bad_steps: int = 10  # stop after this many skipped steps in a row (a step is skipped, and counted in
    # skipped_steps, when the loss or the global gradient norm is not finite on some rank; an applied step resets it)
    deepspeed: bool = False  # DeepSpeed ZeRO engine (one process, or several under the deepspeed launcher / torchrun)
    zero_stage: int = 2  # ZeRO stage with deepspeed: 0 (DDP-like), 1 (optimizer), 2 (+ gradients), 3 (+ parameters)
    compile: bool = False  # torch.compile the model; the Triton kernels are custom ops, so the graph does not break
    compile_mode: str = "default"  # torch.compile mode: default | max-autotune-no-cudagraphs | reduce-overhead (CUDA
    # graphs) | max-autotune
    apex: bool = False  # apex FusedAdam + FusedLayerNorm (apex is not on the package index; torch's fused AdamW is
    # the default)
    tensorboard: bool = True  # TensorBoard scalars in out/tensorboard (when the tensorboard package imports)
    plot: bool = True  # out/metrics.png at the end (when matplotlib imports)
    overwrite: bool = False  # start afresh in an `out` that holds checkpoints of another run (they are deleted)
    allow_changed_data: bool = False  # resume although the data's files changed since the checkpoint (the
    # tokenizer and --init weights must be the checkpoint's: compared by content)
    dist_timeout: float = 600.0  # seconds any collective may wait under deepspeed: a hung or dead rank ends the
    # job with one line after this long instead of blocking it forever

    def validate(self) -> None:
        """Raise ValueError (one line, naming the key) for a wrong type or an invalid value."""
        super().validate()
        if "extra" in self.model:
            raise ValueError("model.extra: free-form notes are not a model override")
        check_types("model.", self.model, field_types(BeitConfig))
        self.positive("keep_last", "max_bad_steps", "grad_accum_steps")
        self.non_negative("warmup_steps", "save_every", "num_workers")
        cap = max_workers()
        if self.num_workers > cap:
            self.bad("num_workers", f"at most {cap} data-loader workers on this machine ({machine_text()})")
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            self.bad("dist_timeout", "must be a positive number of seconds")
        for name in ("min_lr", "weight_decay", "beta1", "beta2", "eps", "clip_grad"):
            if not math.isfinite(getattr(self, name)):
                self.bad(name, "must be a finite number")
        if self.min_lr < 0 or (self.lr is not None and self.min_lr > self.lr):
            self.bad("lr", f"need lr > 0 and 0 <= min_lr ({self.min_lr}) <= lr")
        self.non_negative("weight_decay")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                self.bad(name, "must be in [0, 1)")
        self.positive("eps")
        if self.clip_grad < 0:
            self.bad("clip_grad", "must be >= 0 (0 disables clipping)")
        if not self.preset.strip():
            self.bad("preset", "must not be empty")
        if self.zero_stage not in (0, 1, 2, 3):
            self.bad("zero_stage", "must be 0, 1, 2 or 3")
        if self.compile_mode not in COMPILE_MODES:
            self.bad("compile_mode", f"must be one of {', '.join(COMPILE_MODES)}")
        if self.batch_size % self.grad_accum_steps:
            self.bad("batch_size", f"must be divisible by grad_accum_steps={self.grad_accum_steps}")
        if self.precision not in ("auto", "fp32", "bf16"):
            self.bad("precision", 'must be "auto", "fp32" or "bf16"')
        self.model_config()  # raises on bad preset / model keys

    def model_config(self) -> BeitConfig:
        try:
            return BeitConfig.from_preset(self.preset, **self.model)
        except TypeError as exc:  # a value of a type BeitConfig's own checks did not foresee
            raise ValueError(f"model config {self.model}: {exc}") from None

    def lr_schedule(self) -> Dict[str, Any]:
        """The keyword arguments of `beit_fast.train.optim.warmup_cosine` for this run."""
        return dict(base_lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps, max_steps=self.max_steps)

