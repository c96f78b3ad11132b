"""`unet train`: train a U-Net on image/label pairs and write a run folder with its model files."""

from __future__ import annotations

import json
import signal
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



def command(
    ctx: typer.Context,
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
                         help="Validate every this many steps, and at the end.  \\[default: a tenth "
                              "of the run but at least 50, or 200 with only --max-time]")] = None,
    metric: Annotated[Optional[str], typer.Option("--val-metric",
                      metavar="auto|vrand|vinfo|iou|dice|f1|ap|loss|pixel_error",
                      help="Metric that chooses best.unet; auto: vrand for membrane-type labels, object "
                           "F1 for instance labels, iou otherwise.  \\[default: auto]")] = None,
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
                             help="Channels-last memory layout.  \\[default: on, except on Apple MPS]")] = None,
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
    values = dict(locals())           # the parameters as given: keep this the first line
    from unetcli import runconfig, runfolder, training

    given = _given(values)
    console.detail(f"reading the training data ({given.get('images') or resume})")
    run = runfolder.open_run(given, out=out, resume=resume, command=(ctx.obj or {}).get("argv"))
    if run.ignored:
        spelled = {param.name.rstrip("_"): param.opts[0] for param in ctx.command.params}
        console.warn(f"--resume continues the run as configured; ignoring "
                     f"{', '.join(spelled.get(k, k) for k in run.ignored)}")
    if not run.dist.main:
        console.set_level(quiet=True)
    arch = [k for k in runconfig.NETWORK_OPTIONS if k in run.opts]
    if "init" in run.opts and arch and resume is None:
        console.warn(f"--init takes the network from the model file; ignoring "
                     f"{', '.join('--' + a for a in arch)}")
    p = run.prepared
    console.detail(f"{len(p.train_samples)} training and {len(p.val_samples)} validation images; "
                   f"network {p.net_config}; tile {p.train_config.tile}")
    stop = training.StopFlag()
    previous = _stop_on_signals(stop)
    try:
        with run, console.progress(p.train_config.iterations, "training", keep=True) as advance:
            result = training.train(p.train_config, p.net_config, p.train_samples, p.val_samples, run.run_dir,
                                    normalization=p.normalization, class_names=p.class_names,
                                    augment=p.augment, provenance=run.provenance, init=run.opts.get("init"),
                                    resume=run.resume, dist=run.dist, stop=stop,
                                    progress=_Report(advance, p.train_config.log_every))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if run.dist.main:
        _summary(result, json_)


def _given(values: dict) -> dict:
    """The run options typed on the command line, keyed as ``runconfig.RUN_DEFAULTS`` (a parameter's
    name without a trailing underscore): those whose value differs from the parameter's default."""
    import inspect

    from unetcli import runconfig

    declared = inspect.signature(command).parameters
    given = {}
    for name, value in values.items():
        key = name.rstrip("_")
        if key in runconfig.RUN_DEFAULTS and value != declared[name].default:
            given[key] = str(value) if isinstance(value, Path) else value
    if "max_time" in given:
        given["max_time"] = runconfig.parse_duration(given["max_time"])
    return given


def _stop_on_signals(stop) -> dict:
    """Ctrl-C and SIGTERM set ``stop``: training ends after the current step, with a checkpoint. A second
    one aborts at once (Ctrl-C: exit 130; SIGTERM: guards.Terminated, exit 143). Returns the previous
    handlers."""
    from unetcli import guards

    def on_signal(signum, _frame):
        if stop:
            raise guards.Terminated() if signum == signal.SIGTERM else KeyboardInterrupt
        name = signal.Signals(signum).name
        stop.set(name)
        console.warn(f"{name}: stopping after this step and writing the checkpoint "
                     "(press Ctrl-C again to abort)")

    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


class _Report:
    """Progress of the training loop on stderr: the bar on a terminal, else a line per logged step."""

    def __init__(self, advance, log_every: int):
        self.advance, self.log_every, self.shown = advance, log_every, 0

    def __call__(self, ev: dict) -> None:
        fields = {"loss": f"{ev['loss']:.4f}", "it/s": f"{ev['steps_per_s']:.2f}"}
        fields.update({k: f"{v:.4f}" for k, v in ev["val"].items()})
        if ev["remaining"] is not None:
            fields["left"] = _duration(ev["remaining"])
        self.advance(ev["step"] - self.shown, **fields)
        self.shown = ev["step"]
        if not console.interactive() and ev["step"] % self.log_every == 0:
            total = f"/{ev['total']}" if ev["total"] else ""
            console.info(f"step {ev['step']}{total}  " + "  ".join(f"{k} {v}" for k, v in fields.items()))


def _summary(result, json_: bool) -> None:
    """The model paths (or the summary as JSON) on stdout, a line for a person on stderr."""
    if json_:
        sys.stdout.write(json.dumps(result.to_dict(), sort_keys=True) + "\n")
    else:
        sys.stdout.write(f"{result.best}\n{result.last}\n")
    best = (f"best {result.best_metric} {result.best_value:.4f} at step {result.best_step}"
            if result.best_value is not None else "no score yet")
    console.info(f"{result.step} steps in {_duration(result.elapsed)}; {best}; run folder {result.run_dir}")
    if result.interrupted:
        console.info(f"interrupted ({result.interrupted}); continue with: unet train --resume {result.run_dir}")
        raise typer.Exit(130 if result.interrupted == "SIGINT" else 143)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
