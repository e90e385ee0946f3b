"""Configuration schema: dataclasses validated once, loaded from YAML with dotlist overrides."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from moe_diff.errors import MoeDiffError

ATTENTION_MODES = ("diff", "diff_v2", "standard")
ATTN_BACKENDS = ("reference", "sdpa", "flex", "triton", "flash_attn", "auto")
MOE_BACKENDS = ("reference", "grouped_mm", "megablocks", "auto")


class ConfigError(MoeDiffError, ValueError):
    """A configuration value or key that is not allowed; the message names the field."""


@dataclass
class ModelConfig:
    """Shapes and choices of one MoE decoder. Defaults are Mixtral 8x7B's shapes."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int | None = None  # None: dim // n_heads (see `resolved_head_dim`)
    ffn_dim: int = 14336
    n_experts: int = 8
    top_k: int = 2
    sliding_window: int | None = None  # None: full causal attention
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    max_seq_len: int = 32768
    attention: str = "diff"
    # Kernels, not architecture: left out of comparisons, and a stored checkpoint's are ignored (see Kernels)
    attn_backend: str = field(default="auto", compare=False)  # auto: the fastest correct kernel for each call
    moe_backend: str = field(default="auto", compare=False)
    router_aux_loss_coef: float = 0.02
    router_z_loss_coef: float = 0.001
    capacity_factor: float | None = None  # None: dropless; else each expert takes ceil(cf * N * top_k / E) of N
    router_jitter: float = 0.0  # training only: router input times uniform(1 - j, 1 + j) (Switch Transformer)
    expert_bias_rate: float = 0.0  # > 0: aux-loss-free balancing, a selection bias moved this much per step
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        _validate_model(self)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads


@dataclass(frozen=True)
class Kernels:
    """The kernels a model runs on (ModelConfig's attn_backend and moe_backend): chosen where it runs, never fixed
    by its checkpoint."""

    attn_backend: str = "auto"
    moe_backend: str = "auto"

    @classmethod
    def of(cls, cfg: ModelConfig) -> Kernels:
        return cls(cfg.attn_backend, cfg.moe_backend)

    def on(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` running on these kernels (validated like the config fields)."""
        return dataclasses.replace(cfg, **dataclasses.asdict(self))


KERNEL_FIELDS = tuple(f.name for f in dataclasses.fields(Kernels))
AUTO_KERNELS = Kernels()


def without_kernels(model: dict[str, Any]) -> dict[str, Any]:
    """A model config's stored values (a model section, or a transformers config.json) without the kernels, which
    record how it ran, not what it is."""
    return {key: value for key, value in model.items() if key not in KERNEL_FIELDS}


PRECISIONS = ("auto", "float32", "bfloat16")
LOAD_BALANCE_OVER = ("all_ranks", "each_rank")  # whose tokens the load-balancing loss balances
RESUME_ALLOWED = ("auto (continue the run in train.out_dir, if any), never (start a run; refused where one is), "
                  "restart (move the run there to train.out_dir/previous/N, then start one) or a checkpoint path")
DATA_PARALLEL = ("ddp", "fsdp")
ACTIVATION_CHECKPOINTING = ("none", "block", "moe")  # what recomputes its activations in the backward pass


@dataclass
class TrainConfig:
    """The training loop: batch shape, optimizer, schedule, checkpoints and logging."""

    out_dir: str = "runs/default"
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # global, in sequences per optimizer step, split over data-parallel ranks
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step, each batch_size / grad_accum sequences
    lr: float = 3e-4
    min_lr: float = 3e-5  # the cosine schedule reaches it at max_steps
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.1  # matrices and embeddings only; never norms, lambda vectors
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    save_every: int = 500  # 0: save only at the end and on SIGTERM/SIGINT
    keep_checkpoints: int = 3  # newest checkpoints kept; older ones are deleted
    log_every: int = 10
    eval_every: int = 200  # 0: no validation during training
    eval_batches: int = 8
    resume: str = "auto"  # auto: continue out_dir's run, if any; never: a new run; restart; or a checkpoint path
    seed: int = 0
    compile: bool = False
    activation_checkpointing: str = "none"  # none, block (every block), moe (each MoE layer); true/false: block/none
    precision: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    sample_tokens: int = 200  # tokens sampled from the final model at the end of a run; 0 skips
    trace_every: int = 0  # write a routing trace of fixed validation tokens every N steps; 0: never
    load_balance_over: str = "all_ranks"  # all_ranks: a micro-batch's tokens on every data-parallel rank together

    def __post_init__(self) -> None:
        if not self.out_dir.strip():
            _fail("train.out_dir", self.out_dir, "a directory path (the run's checkpoints and metrics go there)")
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_batches",
                     "keep_checkpoints", "max_nonfinite_steps"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                _fail(f"train.{name}", getattr(self, name), "a positive integer")
        for name in ("warmup_steps", "save_every", "eval_every", "seed", "sample_tokens", "trace_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                _fail(f"train.{name}", getattr(self, name), "an integer >= 0")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                _fail(f"train.{name}", getattr(self, name), "a finite number >= 0")
        for name in ("beta1", "beta2"):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                _fail(f"train.{name}", getattr(self, name), "a number in [0, 1)")
        if self.min_lr > self.lr:
            _fail("train.min_lr", self.min_lr, f"at most train.lr ({self.lr})")
        if self.batch_size % self.grad_accum:
            _fail("train.grad_accum", self.grad_accum, f"a divisor of train.batch_size ({self.batch_size})")
        if self.precision not in PRECISIONS:
            _fail("train.precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        if not self.resume:
            _fail("train.resume", self.resume, RESUME_ALLOWED)
        # configs written before the scopes existed said true or false
        earlier = {"True": "block", "False": "none", True: "block", False: "none"}
        self.activation_checkpointing = earlier.get(self.activation_checkpointing, self.activation_checkpointing)
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            _fail("train.activation_checkpointing", self.activation_checkpointing,
                  f"one of {', '.join(ACTIVATION_CHECKPOINTING)}")
        if self.load_balance_over not in LOAD_BALANCE_OVER:
            _fail("train.load_balance_over", self.load_balance_over, f"one of {', '.join(LOAD_BALANCE_OVER)}")


TOKEN_DTYPES = ("auto", "uint16", "uint32")


@dataclass
class DataConfig:
    """Where training text comes from and how it becomes tokens."""

    source: Any = "builtin"  # "builtin" (the Python standard library's .py files), or paths/globs
    tokenizer: str = "byte"  # "byte" (UTF-8 bytes, no files needed) or a tokenizer.json path
    text_field: str = "text"  # field of .jsonl records holding the text
    token_dtype: str = "auto"  # element type of .bin token files without a .json sidecar
    eot_token: str | None = None  # tokenizer.json: the document separator; None tries common names
    val_fraction: float = 0.05  # share of documents held out for validation

    def __post_init__(self) -> None:
        sources = self.sources
        if not sources or not all(isinstance(item, str) and item for item in sources):
            _fail("data.source", self.source, "'builtin' or non-empty paths/globs (a string or a list)")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            _fail("data.tokenizer", self.tokenizer, "'byte' or the path of a tokenizer.json")
        if self.token_dtype not in TOKEN_DTYPES:
            _fail("data.token_dtype", self.token_dtype, f"one of {', '.join(TOKEN_DTYPES)}")
        if not _is_number(self.val_fraction) or not 0 < self.val_fraction < 1:
            _fail("data.val_fraction", self.val_fraction, "a number strictly between 0 and 1")

    @property
    def sources(self) -> list[str]:
        """`source` as a list of strings."""
        return [self.source] if isinstance(self.source, str) else list(self.source or [])


@dataclass
class ParallelConfig:
    """How a torchrun job splits its processes: dp * cp * tp = world size; ep * cp * tp divides it, ep divides
    n_experts."""

    dp: int | None = None  # None: world size / (cp * tp)
    tp: int = 1
    ep: int = 1  # experts of every layer sharded over groups of ep consecutive ranks
    timeout_s: float = 600.0  # a collective that waits longer (a rank failed or hung) ends the job with an error
    data_parallel: str = "ddp"  # DistributedDataParallel; fsdp: FSDP2 (sharded; HSDP with dp_replicate > 1)
    vocab_parallel: bool = False  # with tp > 1: the embedding and output head split by vocabulary rows too
    dp_replicate: int = 1  # with fsdp, > 1: HSDP, each parameter sharded within groups and replicated over this many
    sequence_parallel: bool = False  # with tp > 1: the residual stream and norms split by sequence over tp in training
    cp: int = 1  # context parallelism: every training sequence split along its length over groups of cp ranks

    def __post_init__(self) -> None:
        if self.dp is not None and (not _is_int(self.dp) or self.dp < 1):
            _fail("parallel.dp", self.dp, "null (inferred from the world size) or a positive integer")
        if not _is_int(self.dp_replicate) or self.dp_replicate < 1 or (self.dp_replicate > 1
                                                                         and self.data_parallel != "fsdp"):
            _fail("parallel.dp_replicate", self.dp_replicate,
                  "a positive integer (above 1 only with parallel.data_parallel=fsdp: HSDP)")
        if not _is_number(self.timeout_s) or self.timeout_s <= 0:
            _fail("parallel.timeout_s", self.timeout_s, "a number of seconds > 0")
        if self.data_parallel not in DATA_PARALLEL:
            removed = (" (allreduce, one all-reduce per parameter after the backward, was slower than ddp in every "
                       "layout measured, benchmarks/results/parallel-layouts-cpu.json, and is gone)"
                       if self.data_parallel == "allreduce" else "")
            _fail("parallel.data_parallel", self.data_parallel, f"one of {', '.join(DATA_PARALLEL)}{removed}")
        for name in ("vocab_parallel", "sequence_parallel"):
            if not isinstance(getattr(self, name), bool) or (getattr(self, name) and self.tp == 1):
                _fail(f"parallel.{name}", getattr(self, name), "true or false (true only with parallel.tp > 1)")
        for name in ("tp", "ep", "cp"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                _fail(f"parallel.{name}", getattr(self, name), "a positive integer")


@dataclass
class Config:
    """A whole job's configuration; each YAML section mirrors one field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            _fail("train.seq_len", self.train.seq_len,
                  f"at most model.max_seq_len ({self.model.max_seq_len})")
        split = self.parallel.tp * self.parallel.cp
        if self.parallel.sequence_parallel and self.train.seq_len % split:
            _fail("train.seq_len", self.train.seq_len, f"a multiple of parallel.tp={self.parallel.tp}"
                  f"{f' x parallel.cp={self.parallel.cp}' if self.parallel.cp > 1 else ''} with "
                  "parallel.sequence_parallel=true (each rank holds its block of positions)")
        if self.model.n_experts % self.parallel.ep:
            _fail("parallel.ep", self.parallel.ep, f"a divisor of model.n_experts ({self.model.n_experts})")


def _fail(name: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError for the dotted field `name` (e.g. 'model.dim')."""
    raise ConfigError(f"{name}={value!r} is not allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_model(cfg: ModelConfig) -> None:
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "n_experts",
                 "max_seq_len"):
        if not _is_int(getattr(cfg, name)) or getattr(cfg, name) < 1:
            _fail(f"model.{name}", getattr(cfg, name), "a positive integer")
    for name in ("rope_theta", "norm_eps"):
        if not _is_number(getattr(cfg, name)) or getattr(cfg, name) <= 0:
            _fail(f"model.{name}", getattr(cfg, name), "a positive finite number")
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        if not _is_number(getattr(cfg, name)) or getattr(cfg, name) < 0:
            _fail(f"model.{name}", getattr(cfg, name), "a finite number >= 0")
    if cfg.capacity_factor is not None and (not _is_number(cfg.capacity_factor) or cfg.capacity_factor <= 0):
        _fail("model.capacity_factor", cfg.capacity_factor, "null (dropless) or a number > 0")
    if not _is_number(cfg.router_jitter) or not 0 <= cfg.router_jitter < 1:
        _fail("model.router_jitter", cfg.router_jitter, "a number in [0, 1)")
    if not _is_number(cfg.expert_bias_rate) or cfg.expert_bias_rate < 0:
        _fail("model.expert_bias_rate", cfg.expert_bias_rate, "a finite number >= 0 (0 turns the bias off)")
    if not isinstance(cfg.tie_embeddings, bool):
        _fail("model.tie_embeddings", cfg.tie_embeddings, "true or false")
    for name, allowed in (("attention", ATTENTION_MODES), ("attn_backend", ATTN_BACKENDS),
                          ("moe_backend", MOE_BACKENDS)):
        if getattr(cfg, name) not in allowed:
            _fail(f"model.{name}", getattr(cfg, name), f"one of {', '.join(allowed)}")
    if cfg.moe_backend == "grouped_mm" and (cfg.dim % 8 or cfg.ffn_dim % 8):
        _fail("model.moe_backend", "grouped_mm", f"needs dim and ffn_dim divisible by 8 (got {cfg.dim} and "
                                                  f"{cfg.ffn_dim}): grouped GEMMs want 16-byte aligned rows")
    if cfg.head_dim is None and cfg.dim % cfg.n_heads:
        _fail("model.head_dim", None, f"null only when dim ({cfg.dim}) is divisible by n_heads "
                                      f"({cfg.n_heads}); set head_dim explicitly")
    head_dim = cfg.resolved_head_dim
    if not _is_int(head_dim) or head_dim < 2 or head_dim % 2:
        _fail("model.head_dim", head_dim, "an even integer >= 2 (rotary embeddings rotate pairs)")
    if cfg.n_heads % cfg.n_kv_heads:
        _fail("model.n_kv_heads", cfg.n_kv_heads, f"a divisor of n_heads ({cfg.n_heads})")
    if cfg.attention == "diff" and (cfg.n_heads % 2 or cfg.n_kv_heads % 2):
        _fail("model.attention", "diff", f"'diff' needs even n_heads and n_kv_heads (got {cfg.n_heads} "
                                         f"and {cfg.n_kv_heads}): heads pair up into differential heads")
    if not _is_int(cfg.top_k) or not 1 <= cfg.top_k <= cfg.n_experts:
        _fail("model.top_k", cfg.top_k, f"an integer from 1 to n_experts ({cfg.n_experts})")
    window = cfg.sliding_window
    if window is not None and (not _is_int(window) or window < 1):
        _fail("model.sliding_window", window, "null (full causal attention) or an integer >= 1")


def _field_names(schema: Any, prefix: str = "") -> list[str]:
    names = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.default_factory):  # a section: list its fields
            names += _field_names(f.default_factory, f"{prefix}{f.name}.")
        else:
            names.append(prefix + f.name)
    return names


TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "None": "null"}


def _explain(error: OmegaConfBaseException, prefix: str = "", given: Sequence[str] = ()) -> ConfigError:
    """A ConfigError naming the dotted key (under `prefix`): for an unknown key the closest known ones, for a value
    of the wrong type the type allowed. `given` holds the dotted keys the user typed (overrides)."""
    key = prefix + str(getattr(error, "full_key", None) or getattr(error, "key", None) or "?")
    if isinstance(error, ConfigKeyError):
        return _unknown_key(next((name for name in given if name.startswith(key + ".")), key))
    schema_field = _schema_field(key) if isinstance(error, ValidationError) else None
    if schema_field is None:
        return ConfigError(f"config key {key!r}: {str(error).splitlines()[0]}")
    allowed = " or ".join(TYPE_NAMES.get(part.strip(), part.strip()) for part in str(schema_field.type).split("|"))
    default = schema_field.default
    if default is not None and default is not dataclasses.MISSING:
        allowed += f", e.g. {key}={str(default).lower() if isinstance(default, bool) else default}"
    value = getattr(error, "value", None)
    return ConfigError(f"{key}={'null' if value is None else repr(value)} is not allowed: {allowed}"
                       + ("; an empty value means null" if value is None else ""))


def _schema_field(key: str) -> dataclasses.Field | None:
    """The field of the config schema at a dotted key such as 'model.dim', if there is one."""
    section, _, name = key.partition(".")
    schema = next((f.default_factory for f in dataclasses.fields(Config) if f.name == section), None)
    fields = dataclasses.fields(schema) if dataclasses.is_dataclass(schema) else ()
    return next((f for f in fields if f.name == name), None)


def _unknown_key(typed: str) -> ConfigError:
    """The ConfigError of an unknown dotted key: the closest known keys and the keys of their section."""
    keys: dict[str, list[str]] = {}  # section -> its keys
    for name in _field_names(Config):
        keys.setdefault(name.split(".")[0], []).append(name.split(".", 1)[1])
    section, _, name = typed.partition(".")
    if section in keys:  # a key of a known section: the closest of its keys
        close = [f"{section}.{key}" for key in _closest(name, keys[section])]
    else:  # the closest key anywhere (the closest section, for a bare name), which names the intended section
        close = _closest(typed, _field_names(Config) if name else list(keys))
        section = close[0].split(".")[0] if close else ""
    if not section:
        return ConfigError(f"unknown config key {typed!r}; the sections are {', '.join(keys)}")
    guess = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    return ConfigError(f"unknown config key {typed!r}{guess}; keys of {section}: {', '.join(keys[section])}")


def _closest(word: str, options: list[str]) -> list[str]:
    """The options spelt much like `word`, or else the one spelt most like it, if any is close."""
    return difflib.get_close_matches(word, options, n=3, cutoff=0.8) or difflib.get_close_matches(word, options, n=1)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply `a.b=value` overrides, validate."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form section.key=value "
                              "(for example model.n_layers=4)")
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _explain(error, given=[item.split("=", 1)[0] for item in overrides]) from None


def section_from_dict(section: str, values: Any) -> Any:
    """One validated section of the job config ('model', 'train', 'data' or 'parallel') from plain values (a
    stored config): unknown keys and bad values raise the same ConfigError as in a config file."""
    schemas = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section!r} must be a mapping of keys to values, got {values!r}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schemas[section]), values))
    except OmegaConfBaseException as error:
        raise _explain(error, prefix=f"{section}.") from None


def to_yaml(cfg: Config | ModelConfig, data: DataConfig | None = None) -> str:
    """YAML text of a config; a ModelConfig is written under its `model:` section, with `data:` where given."""
    if isinstance(cfg, ModelConfig):
        sections = {"model": cfg} | ({"data": data} if data is not None else {})
        return OmegaConf.to_yaml({name: OmegaConf.structured(section) for name, section in sections.items()})
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
