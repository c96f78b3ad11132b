"""A training run from its options: the one table of options and defaults, the data read and checked.

:data:`RUN_DEFAULTS` names every option of a run once, with its default: the network's come from
``UNetConfig``, the loop's from :class:`TrainConfig`, the weight map's from ``weightmap``. A run's
options (as given, without the defaults) are saved in ``RUN_DIR/config.json`` so that ``--resume``
rebuilds the same run; ``unet train`` derives them from its own parameters, which carry the same names.

:func:`prepare` reads the images and labels, checks everything about them and builds the run's
configurations, before any training step and before anything is written.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from unetcli import checkpoint, weightmap
from unetcli.errors import ConfigError
from unetcli.netspec import UNetConfig, check_tile, refuse_unknown
from unetcli.validation import METRICS

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "poly", "onecycle")
LOSSES = ("ce", "ce+dice")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run except the network (``UNetConfig``) and the data."""

    tile: int = 572
    batch: int = 1
    iterations: int | None = None       # optimiser steps; None: from epochs or the time budget
    epochs: float | None = None         # one epoch = as many output pixels as the training set has
    max_time: float | None = None       # seconds of wall clock for the whole run (validation included)
    optimizer: str = "sgd"
    lr: float | None = None             # None: 0.01 for SGD, 1e-3 for Adam/AdamW
    momentum: float = 0.99
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: float = 0.02                # fraction of the run with a linear warm-up
    loss: str = "ce"
    val_every: int | None = None        # steps; None: a tenth of the run but at least 50 steps
    checkpoint_every: int = 200
    log_every: int = 10
    metric: str = "auto"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None   # None: on CUDA and CPU
    workers: int | None = None          # None: 0 on a CPU with 2 cores or fewer, else up to 4
    compile: bool = False
    gpu_augment: bool | None = None     # None: on when training on CUDA
    val_tile: int | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS),
                                     ("schedule", self.schedule, SCHEDULES), ("loss", self.loss, LOSSES),
                                     ("precision", self.precision, PRECISIONS),
                                     ("val-metric", self.metric, METRICS)):
            if value not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.batch < 1:
            raise ConfigError(f"--batch must be at least 1, not {self.batch}")
        if self.iterations is not None and self.iterations < 1:
            raise ConfigError(f"--iterations must be at least 1, not {self.iterations}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"--epochs must be positive, not {self.epochs}")
        if self.max_time is not None and self.max_time <= 0:
            raise ConfigError("--max-time must be positive")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be positive, not {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), not {self.momentum}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup must be in [0, 1), not {self.warmup}")
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.val_every is not None and self.val_every < 1:
            raise ConfigError("--val-every must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise ConfigError("--workers must be 0 or more")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (0.01 if self.optimizer == "sgd" else 1e-3)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ------------------------------------------------------------------------------ the table of options

NETWORK_OPTIONS = ("base", "depth", "padding", "batchnorm", "dropout")
AUGMENT_OPTIONS = ("augment", "augmentations", "elastic_sigma", "elastic_grid", "scale_range")

# Every option of a run with its default. Keys not here are refused, so a typo cannot pass silently.
RUN_DEFAULTS: dict = {
    "images": None, "labels": None, "weights": "auto", "val_images": None, "val_labels": None,
    "val_split": None, "val_index": None, "foreground": None, "classes": None, "border_width": None,
    "w0": weightmap.DEFAULT_W0, "sigma": weightmap.DEFAULT_SIGMA, "balance": "dataset", "init": None,
    "normalize": "percentile", "target": "two-class", "channels": None,
    **{name: getattr(UNetConfig, name) for name in NETWORK_OPTIONS},
    **dict.fromkeys(AUGMENT_OPTIONS), "augment": True,
    **{f.name: f.default for f in dataclasses.fields(TrainConfig)},
}
# Options that may differ when a run is resumed (where it runs, not what it computes).
RESUME_OVERRIDES = ("device", "workers")


def parse_duration(text: str) -> float:
    """'30m', '1h', '1h30m', '90s', '45' (seconds) -> seconds."""
    t = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        value = float(t)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|m|min|s|sec)", t)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(h|min|m|sec|s)", "", t).strip():
            raise ConfigError(f"--max-time {text!r}: not a duration", hint="write e.g. 30m, 1h30m or 90s")
        value = sum(float(n) * {"h": 3600, "m": 60, "min": 60, "s": 1, "sec": 1}[u] for n, u in parts)
    if value <= 0:
        raise ConfigError(f"--max-time {text!r}: must be positive")
    return value


def augment_config(opts: dict):
    """The ``transforms.AugmentConfig`` of the options: the module's training defaults, only the
    steps named in ``augmentations`` (comma-separated, of ``transforms.ORDER``), or none."""
    from unetcli import transforms

    if not opts.get("augment", True):
        return transforms.AugmentConfig.none()
    names = opts.get("augmentations")
    if names is not None:
        steps = [n.strip() for n in str(names).split(",") if n.strip()]
        cfg = transforms.AugmentConfig.only(*steps) if steps else transforms.AugmentConfig.none()
    else:
        cfg = transforms.AugmentConfig()
    changes = {}
    if opts.get("elastic_sigma") is not None:
        changes["sigma"] = float(opts["elastic_sigma"])
    if opts.get("scale_range") is not None:
        text = opts["scale_range"]
        try:
            lo, hi = (float(v) for v in str(text).split(","))
        except ValueError:
            raise ConfigError(f"--scale-range {text!r}: expected LOW,HIGH zoom factors, e.g. 0.7,1.4") from None
        changes["scale_range"] = (lo, hi)
    if opts.get("elastic_grid") is not None:
        changes["grid"] = int(opts["elastic_grid"])
    return dataclasses.replace(cfg, **changes) if changes else cfg


def record_of(obj) -> dict:
    """A dataclass as a JSON-ready dict (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(obj).items()}


def default_tile(net_config: UNetConfig, samples) -> int:
    """572 for the paper's network (388 output), else the valid tile whose output is nearest 388;
    smaller when every training image is smaller than that output."""
    from unetcli.netspec import output_size, valid_input_sizes

    want = min(388, max(max(s.target.shape) for s in samples))
    sizes = valid_input_sizes(net_config, 1, 2048)
    return next((size for size in sizes if output_size(net_config, size) >= want), sizes[-1])


# ------------------------------------------------------------------------------------ reading the data

class Prepared(NamedTuple):
    """What :func:`prepare` returns: everything a run needs besides its folder."""

    train_config: TrainConfig
    net_config: UNetConfig
    train_samples: list
    val_samples: list
    normalization: dict
    class_names: list[str]
    augment: object                     # transforms.AugmentConfig
    data_note: dict                     # what the provenance records about the data


def prepare(opts: dict, *, cache_dir: Path | None = None) -> Prepared:
    """Read and check the data of a run and build its configs, weight maps included; no training yet.

    Every input problem is raised here, before any training step. ``cache_dir`` keeps the computed
    weight maps (``--weights auto``) for the next run on the same data.
    """
    prepared = read(opts)
    add_weights(prepared.train_samples, {**RUN_DEFAULTS, **opts}, cache_dir)
    return prepared


def read(opts: dict) -> Prepared:
    """:func:`prepare` without the weight maps: reads and checks, writes nothing."""
    from unetcli import data as datamod
    from unetcli import labels as labelmod
    from unetcli import normalize

    o = _checked_options(opts)
    tc = TrainConfig.from_dict(o)           # checks the training settings first: cheap and early
    classes = _values(o["classes"], "--classes")
    pairs = datamod.pair_files(o["images"], o["labels"], _weights_path(o["weights"]))
    picked = normalize.parse_channels(o["channels"]) if isinstance(o["channels"], str) else o["channels"]
    kw = {"foreground": _values(o["foreground"], "--foreground"), "classes": classes,
          "border_width": o["border_width"], "norm": _normalization_rule(o, "normalize" in opts),
          "channels": picked, "target": o["target"]}
    train_samples, val_samples = _samples(o, pairs, kw, tc.seed)
    k = 3 if o["target"] == "three-class" else labelmod.num_classes(classes)
    channels = datamod.check_samples(train_samples, k, "training")
    if val_samples:
        val_channels = datamod.check_samples(val_samples, k, "validation")
        if val_channels != channels:
            raise ConfigError(f"validation images have {val_channels} channel(s), training images {channels}")
    net_config = _network(o, channels, k)
    if opts.get("tile") is None:
        tc = dataclasses.replace(tc, tile=default_tile(net_config, train_samples))
    check_tile(net_config, tc.tile)
    if tc.val_tile is not None:
        check_tile(net_config, tc.val_tile)
    norm = kw["norm"] if kw["norm"] is not None else datamod.normalization(train_samples)
    if classes is not None:
        class_names = [f"class{v}" for v in classes]
    elif o["target"] == "three-class":
        class_names = ["background", "interior", "border"]
    else:
        class_names = ["background", "foreground"]
    data_note = {"images": str(o["images"]), "labels": str(o["labels"]),
                 "inputs": {"channels": [i + 1 for i in picked] if picked else None,
                            "dtype": train_samples[0].dtype or None},
                 "weights": str(o["weights"]), "train": [s.name for s in train_samples],
                 "validation": [s.name for s in val_samples],
                 "fingerprint": datamod.fingerprint(train_samples)}
    return Prepared(tc, net_config, train_samples, val_samples, norm, class_names, augment_config(o), data_note)


def add_weights(samples, opts: dict, cache_dir: Path | None) -> None:
    """The paper's weight maps for ``samples`` when the options ask for them (``--weights auto``)."""
    from unetcli import data as datamod

    if opts["weights"] == "auto":
        datamod.auto_weights(samples, w0=float(opts["w0"]), sigma=float(opts["sigma"]),
                             balance=opts["balance"], cache_dir=cache_dir)


def _values(text, option: str):
    from unetcli import labels as labelmod

    return labelmod.parse_values(text, option=option) if isinstance(text, str) else text


def _weights_path(weights):
    return None if weights in (None, "auto", "none") else weights


def _checked_options(opts: dict) -> dict:
    """The options with their defaults filled in, after the checks that need no file."""
    refuse_unknown(opts, RUN_DEFAULTS, "training options")
    o = {**RUN_DEFAULTS, **opts}
    if o["images"] is None or o["labels"] is None:
        raise ConfigError("give --images and --labels (or --resume RUN_DIR)")
    if o["foreground"] is not None and o["classes"] is not None:
        raise ConfigError("--foreground and --classes exclude each other")
    if o["balance"] not in ("image", "dataset", "none"):
        raise ConfigError(f"--balance must be image, dataset or none, not {o['balance']!r}")
    selectors = [k for k in ("val_images", "val_split", "val_index") if o[k] is not None]
    if len(selectors) > 1:
        raise ConfigError(f"--{selectors[0].replace('_', '-')} and --{selectors[1].replace('_', '-')} "
                          "exclude each other: choose one way to pick validation images")
    if (o["val_images"] is None) != (o["val_labels"] is None):
        raise ConfigError("--val-images and --val-labels go together")
    if o["target"] == "three-class" and o["classes"] is not None:
        raise ConfigError("--target three-class needs instance labels or binary masks, not --classes")
    return o


def _normalization_rule(o: dict, given: bool) -> dict | None:
    """The normalisation record of the run; None where it is computed from the training images."""
    from unetcli import normalize

    if o["init"] is not None and not given:
        rule = None                          # fine-tuning keeps the rule of the model it starts from
    else:
        rule = normalize.parse(o["normalize"]) if isinstance(o["normalize"], str) else o["normalize"]
        if rule is not None and normalize.kind(rule) == "dataset" and "mean" not in rule:
            rule = None                      # computed from the training images
    if o["init"] is not None and rule is None:
        init_norm = checkpoint.load_model(o["init"]).normalization
        rule = init_norm if normalize.kind(init_norm) != "dataset" else None
    return rule


def _samples(o: dict, pairs, kw: dict, seed: int) -> tuple[list, list]:
    """The training and validation samples: pages held out by --val-index/--val-split, or --val-images."""
    from unetcli import data as datamod

    val_pick: set[int] = set()
    if o["val_index"] is not None or o["val_split"] is not None:
        count = datamod.count_pages(pairs)
        if o["val_index"] is not None:
            val_pick = set(datamod.parse_index(str(o["val_index"]), count))
        else:
            val_pick = set(datamod.split_validation(count, float(o["val_split"]), seed))
        if len(val_pick) >= count:
            raise ConfigError(f"--val-index {o['val_index']}: leaves no training images out of {count}")
    samples = datamod.load_pairs(pairs, **kw)
    train = [s for i, s in enumerate(samples) if i not in val_pick]
    val = [s for i, s in enumerate(samples) if i in val_pick]
    if o["val_images"] is not None:
        val = datamod.load_pairs(datamod.pair_files(o["val_images"], o["val_labels"]), **kw)
    return train, val


def _network(o: dict, channels: int, num_classes: int) -> UNetConfig:
    """The network of the options, or with ``--init`` that of the model file (a new head for another
    class count); its input channels must match the images'."""
    if o["init"] is None:
        return UNetConfig(in_channels=channels, num_classes=num_classes, depth=int(o["depth"]),
                          base=int(o["base"]), padding=o["padding"], batchnorm=bool(o["batchnorm"]),
                          dropout=float(o["dropout"]))
    mf = checkpoint.load_model(o["init"])
    if mf.config.in_channels != channels:
        raise ConfigError(f"{mf.path}: the model takes {mf.config.in_channels} input channel(s), the "
                          f"training images have {channels}")
    return dataclasses.replace(mf.config, num_classes=num_classes)
