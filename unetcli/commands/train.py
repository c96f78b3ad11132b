"""`unet train`: train a U-Net on image/label pairs and write a run folder with its model files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from unetcli import console
from unetcli.options import Classes, Device, Foreground, Seed

NAME = "train"
HELP = ("Train a U-Net: weighted pixel-wise softmax cross-entropy, large tiles, elastic deformation, "
        "checkpoints; on a CPU, a GPU, or several under torchrun.")
EPILOG = """Examples:

  # the paper's recipe on the ISBI 2012 stack: train on slices 0-24, validate on 25-29
  unet train --images train-volume.tif --labels train-labels.tif --val-index 25-29 --out runs/em

  # a smaller, faster network within a 30-minute budget on a laptop CPU
  unet train --images imgs/ --labels labels/ --base 32 --optimizer adam --max-time 30m --out runs/quick

  # fine-tune a saved model on a few images of your own, with three classes
  unet train --images mine/ --labels mine-labels/ --classes 0,1,2 --init runs/em/best.unet --out runs/mine

  # continue an interrupted run where it stopped
  unet train --resume runs/em

  # two GPUs (or two CPU processes with gloo) on one machine
  torchrun --nproc_per_node 2 -m unetcli train --images imgs/ --labels labels/ --out runs/ddp"""

_P = Path


def command(
    images: Annotated[Optional[Path], typer.Option("--images", metavar="DIR|STACK",
                      help="Training images: a folder (paired with --labels by file stem) or a "
                           "multi-page stack.")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", metavar="DIR|STACK",
                      help="Label images: instance labels, binary masks (0/255) or class maps.")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", metavar="DIR|STACK|auto|none",
                       help="Loss weight maps: 'auto' computes the paper's maps once (cached in "
                            "RUN_DIR/weights), 'none' weighs every pixel 1, or a folder/stack of "
                            "float maps.  \\[default: auto]")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", metavar="RUN_DIR",
                   help="Run folder to create: model files, checkpoints, configuration, metrics, "
                        "curves.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", metavar="RUN_DIR",
                      help="Continue the run in RUN_DIR from its last checkpoint (same step, "
                           "optimiser state and random state); other options come from the run.")] = None,
    val_images: Annotated[Optional[Path], typer.Option("--val-images", metavar="DIR|STACK",
                          help="Validation images (with --val-labels).")] = None,
    val_labels: Annotated[Optional[Path], typer.Option("--val-labels", metavar="DIR|STACK",
                          help="Validation labels.")] = None,
    val_split: Annotated[Optional[float], typer.Option("--val-split", metavar="FRACTION",
                         help="Hold out this fraction of the images (chosen with --seed) for "
                              "validation.")] = None,
    val_index: Annotated[Optional[str], typer.Option("--val-index", metavar="LIST",
                         help="Hold out these images or stack pages, counted from 0: e.g. 25-29 or "
                              "0,7,9.")] = None,
    foreground: Foreground = None,
    classes: Classes = None,
    border_width: Annotated[Optional[int], typer.Option("--border-width", metavar="PX",
                            help="Separation border carved between touching objects of instance "
                                 "labels (as in unet weights).  \\[default: 2]")] = None,
    target: Annotated[Optional[str], typer.Option("--target", metavar="two-class|three-class",
                      help="What the network learns from instance labels: two-class (background, object; "
                           "touching objects carved apart) or three-class (background, interior, border; "
                           "instances grown from the interiors).  \\[default: two-class]")] = None,
    normalize: Annotated[Optional[str], typer.Option("--normalize",
                         metavar="percentile[:LOW,HIGH]|zscore|dataset",
                         help="Intensity normalisation stored in the model: percentile maps each image's "
                              "1st..99.8th percentiles to 0..1 (any bit depth), zscore uses each image's mean "
                              "and std, dataset the training set's mean and std (unet 0.2's rule).  "
                              "\\[default: percentile]")] = None,
    scale_range: Annotated[Optional[str], typer.Option("--scale-range", metavar="LOW,HIGH",
                           help="Zoom factors of the scale augmentation (log-uniform), e.g. 0.7,1.4 for "
                                "images taken at other magnifications.  \\[default: 0.9,1.1]")] = None,
    channels: Annotated[Optional[str], typer.Option("--channels", metavar="LIST",
                        help="Pick and order the image channels the model learns from, 1-based: e.g. 2 "
                             "(the nuclear stain of a 3-channel TIFF) or 3,1.")] = None,
    w0: Annotated[Optional[float], typer.Option("--w0", help="Border term weight of --weights auto.  "
                                                               "\\[default: 10]")] = None,
    sigma: Annotated[Optional[float], typer.Option("--sigma", metavar="PX",
                     help="Border term width of --weights auto.  \\[default: 5]")] = None,
    balance: Annotated[Optional[str], typer.Option("--balance", metavar="dataset|image|none",
                       help="Class balance of --weights auto.  \\[default: dataset]")] = None,
    init: Annotated[Optional[str], typer.Option("--init", metavar="MODEL",
                    help="Start from this model (name or .unet path) instead of random weights; a "
                         "different class count gets a new head.")] = None,
    tile: Annotated[Optional[int], typer.Option("--tile", metavar="PX",
                    help="Input tile side (572 for the paper's network: output 388).")] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", metavar="N",
                     help="Tiles per step and process.  \\[default: 1]")] = None,
    iterations: Annotated[Optional[int], typer.Option("--iterations", metavar="N",
                          help="Optimiser steps to train.")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", metavar="N",
                      help="Train this many epochs (one epoch = as many output pixels as the "
                           "training images hold).  \\[default: 10 without --iterations/--max-time]")] = None,
    max_time: Annotated[Optional[str], typer.Option("--max-time", metavar="DURATION",
                        help="Wall-clock budget, e.g. 30m or 1h30m; the learning-rate schedule is "
                             "fitted to it.")] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", metavar="sgd|adam|adamw",
                         help="SGD with momentum (the paper's), Adam or AdamW.  \\[default: sgd]")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.  \\[default: 0.01 "
                                                             "for sgd, 0.001 for adam]")] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help="SGD momentum.  "
                                                      "\\[default: 0.99]")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay",
                            help="L2 weight decay (AdamW: decoupled, default 0.01).  \\[default: 0]")] = None,
    schedule: Annotated[Optional[str], typer.Option("--schedule",
                        metavar="cosine|constant|poly|onecycle",
                        help="Learning-rate schedule over the run.  \\[default: cosine]")] = None,
    warmup: Annotated[Optional[float], typer.Option("--warmup", metavar="FRACTION",
                      help="Fraction of the run with a linear warm-up.  \\[default: 0.02]")] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", metavar="ce|ce+dice",
                    help="Weighted cross-entropy (the paper's), or plus soft Dice.  "
                         "\\[default: ce]")] = None,
    base: Annotated[Optional[int], typer.Option("--base", help="Channels of the first level.  "
                                                               "\\[default: 64]")] = None,
    depth: Annotated[Optional[int], typer.Option("--depth", help="Number of poolings.  "
                                                                 "\\[default: 4]")] = None,
    padding: Annotated[Optional[str], typer.Option("--padding", metavar="valid|same",
                       help="Unpadded (the paper's) or zero-padded convolutions.  "
                            "\\[default: valid]")] = None,
    batchnorm: Annotated[Optional[bool], typer.Option("--batchnorm/--no-batchnorm",
                         help="Batch normalisation after each convolution.  "
                              "\\[default: no-batchnorm]")] = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout",
                       help="Dropout at the end of the contracting path.  \\[default: 0.5]")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment",
                       help="Elastic deformation, rotations, flips and gray-value changes on the "
                            "fly.  \\[default: augment]")] = None,
    augmentations: Annotated[Optional[str], typer.Option("--augmentations", metavar="LIST",
                             help="Only these augmentations, comma-separated, of shift, flip, rotate, "
                                  "scale, elastic, brightness, contrast, gamma, noise.  \\[default: "
                                  "all]")] = None,
    elastic_sigma: Annotated[Optional[float], typer.Option("--elastic-sigma", metavar="PX",
                             help="Standard deviation of the elastic displacements.  "
                                  "\\[default: 10]")] = None,
    elastic_grid: Annotated[Optional[int], typer.Option("--elastic-grid", metavar="N",
                            help="Coarse grid of the elastic displacements (N x N).  "
                                 "\\[default: 3]")] = None,
    val_every: Annotated[Optional[int], typer.Option("--val-every", metavar="STEPS",
                         help="Validate every this many steps.  \\[default: a tenth of the run, or "
                              "200]")] = None,
    val_metric: Annotated[Optional[str], typer.Option("--val-metric",
                          metavar="auto|vrand|vinfo|iou|dice|loss|pixel_error",
                          help="Metric that chooses best.unet; auto: vrand for membrane-type "
                               "labels, iou otherwise.  \\[default: auto]")] = None,
    val_tile: Annotated[Optional[int], typer.Option("--val-tile", metavar="PX",
                        help="Tile of the whole-image validation prediction.  \\[default: "
                             "chosen by predict]")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", metavar="STEPS",
                                help="Write the checkpoint every this many steps.  "
                                     "\\[default: 200]")] = None,
    log_every: Annotated[Optional[int], typer.Option("--log-every", metavar="STEPS",
                         help="Write a metrics row every this many steps.  \\[default: 10]")] = None,
    seed: Seed = None,
    deterministic: Annotated[Optional[bool], typer.Option("--deterministic/--no-deterministic",
                             help="Only deterministic kernels (slower on a GPU).  "
                                  "\\[default: no-deterministic]")] = None,
    device: Device = "auto",
    precision: Annotated[Optional[str], typer.Option("--precision", metavar="auto|fp32|bf16|fp16",
                         help="Mixed precision; auto: bf16 on a GPU that has it, else fp32.  "
                              "\\[default: auto]")] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last",
                             help="Channels-last memory layout.  \\[default: on a GPU]")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", metavar="N",
                       help="Data loading processes.  \\[default: 0 on a 2-core CPU, else up to "
                            "4]")] = None,
    compile_: Annotated[Optional[bool], typer.Option("--compile/--no-compile",
                        help="Compile the network with torch.compile.  \\[default: no-compile]")] = None,
    gpu_augment: Annotated[Optional[bool], typer.Option("--gpu-augment/--no-gpu-augment",
                           help="Augment batches on the GPU instead of in the data loader.  "
                                "\\[default: on a GPU]")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the final summary as one JSON "
                                                       "object.")] = False,
) -> None:
    import signal

    from unetcli import training
    from unetcli.errors import ConfigError

    given = {
        "images": images, "labels": labels, "weights": weights, "val_images": val_images,
        "val_labels": val_labels, "val_split": val_split, "val_index": val_index,
        "foreground": foreground, "classes": classes, "border_width": border_width, "w0": w0,
        "sigma": sigma, "balance": balance, "init": init, "tile": tile, "batch": batch,
        "iterations": iterations, "epochs": epochs, "optimizer": optimizer, "lr": lr,
        "momentum": momentum, "weight_decay": weight_decay, "schedule": schedule, "warmup": warmup,
        "loss": loss, "base": base, "depth": depth, "padding": padding, "batchnorm": batchnorm,
        "dropout": dropout, "augment": augment, "augmentations": augmentations, "elastic_sigma": elastic_sigma,
        "elastic_grid": elastic_grid, "val_every": val_every, "metric": val_metric,
        "val_tile": val_tile, "checkpoint_every": checkpoint_every, "log_every": log_every,
        "seed": seed, "deterministic": deterministic, "precision": precision,
        "channels_last": channels_last, "workers": workers, "compile": compile_,
        "gpu_augment": gpu_augment, "target": target, "normalize": normalize, "channels": channels,
        "scale_range": scale_range,
    }
    given = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if v is not None}
    if max_time is not None:
        given["max_time"] = training.parse_duration(max_time)
    if device != "auto":
        given["device"] = device

    if resume is not None:
        if out is not None:
            raise ConfigError("--resume and --out exclude each other", hint="--resume RUN_DIR continues "
                              "the run in RUN_DIR")
        run_dir = resume
        cfg_path = run_dir / "config.json"
        if not (run_dir / training.STATE_FILE).is_file() or not cfg_path.is_file():
            raise training.RunFolderError(f"{run_dir}: not a run folder with a checkpoint "
                                          f"(needs config.json and {training.STATE_FILE})")
        try:
            saved = json.loads(cfg_path.read_text(encoding="utf-8"))
            opts = dict(saved["options"])
        except (ValueError, KeyError, OSError) as exc:
            raise training.RunFolderError(f"{cfg_path}: damaged run configuration ({exc})") from exc
        ignored = sorted(k for k in given if k not in training.RESUME_OVERRIDES)
        if ignored:
            console.warn(f"--resume continues the run as configured; ignoring "
                         f"{', '.join('--' + k.replace('_', '-') for k in ignored)}")
        opts.update({k: v for k, v in given.items() if k in training.RESUME_OVERRIDES})
    else:
        if out is None:
            raise ConfigError("say where the run goes: --out RUN_DIR", hint="or continue one with --resume")
        run_dir = out
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: exists and is not a folder")
        if run_dir.is_dir() and any((run_dir / n).exists() for n in ("config.json", training.STATE_FILE,
                                                                      "last.unet")):
            raise ConfigError(f"{run_dir}: already holds a training run",
                              hint="continue it with --resume, or give another --out")
        # missing folders are created when training starts (like mkdir -p); check they can be
        ancestor = run_dir.parent.absolute()
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ConfigError(f"{run_dir}: {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(f"{run_dir}: cannot create it in {ancestor} (permission denied)")
        opts = given

    dist = training.init_distributed(opts.get("device", "auto"))
    if not dist.main:
        console.set_level(quiet=True)
    console.detail(f"reading the training data ({opts.get('images')})")
    tc, net_config, train_samples, val_samples, norm, class_names, augment_cfg, data_note = \
        training.prepare(opts, dist=dist, cache_dir=(run_dir / "weights") if dist.main else None)
    arch = [k for k in ("base", "depth", "padding", "batchnorm", "dropout") if k in opts]
    if "init" in opts and arch and resume is None:
        console.warn(f"--init takes the network from the model file; ignoring "
                     f"{', '.join('--' + a for a in arch)}")
    console.detail(f"{len(train_samples)} training and {len(val_samples)} validation images; "
                   f"network {net_config}; tile {tc.tile}")

    if dist.main and resume is None:
        import datetime

        from unetcli import __version__

        run_dir.mkdir(parents=True, exist_ok=True)
        training.write_json(run_dir / "config.json", {
            "command": sys.argv, "options": opts, "train": tc.to_dict(), "network": net_config.to_dict(),
            "augment": _as_dict(augment_cfg), "normalization": norm, "class_names": class_names,
            "seed": tc.seed, "data": data_note, "world_size": dist.world, "unet_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })

    stop = training.StopFlag()
    previous = {}

    def on_signal(signum, _frame):
        name = signal.Signals(signum).name
        if stop:                                   # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        stop.set(name)
        console.warn(f"{name}: stopping after this step and writing the checkpoint "
                     "(press Ctrl-C again to abort)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    provenance = {"command": " ".join(sys.argv), "data": data_note, "run_dir": str(run_dir)}
    try:
        with console.progress(tc.iterations, "training") as advance:
            state = {"last": 0, "lines": 0}

            def report(ev: dict) -> None:
                n = ev["step"] - state["last"]
                state["last"] = ev["step"]
                fields = {"loss": f"{ev['loss']:.4f}", "it/s": f"{ev['steps_per_s']:.2f}"}
                fields.update({k: f"{v:.4f}" for k, v in ev["val"].items()})
                if ev["remaining"] is not None:
                    fields["left"] = _duration(ev["remaining"])
                advance(n, **fields)
                if not console.interactive() and ev["step"] % tc.log_every == 0:
                    total = f"/{ev['total']}" if ev["total"] else ""
                    console.info(f"step {ev['step']}{total}  " + "  ".join(f"{k} {v}" for k, v in fields.items()))

            result = training.train(tc, net_config, train_samples, val_samples, run_dir,
                                    normalization=norm, class_names=class_names, augment=augment_cfg,
                                    provenance=provenance, init=opts.get("init"),
                                    resume=resume is not None, dist=dist, progress=report, stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not dist.main:
        return
    summary = result.to_dict()
    if json_:
        sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
    else:
        sys.stdout.write(f"{result.best}\n{result.last}\n")
    best = (f"best {result.best_metric} {result.best_value:.4f} at step {result.best_step}"
            if result.best_value is not None else "no score yet")
    console.info(f"{result.step} steps in {_duration(result.elapsed)}; {best}; run folder {run_dir}")
    if result.interrupted:
        console.info(f"interrupted ({result.interrupted}); continue with: unet train --resume {run_dir}")
        raise typer.Exit(130 if result.interrupted == "SIGINT" else 143)


def _as_dict(obj) -> dict:
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(obj).items()}
    return dict(getattr(obj, "__dict__", {}))


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
