"""The bioimage.io description of a unet model: what ``rdf.yaml`` says, computed without torch.

A bioimage.io model package (https://bioimage.io, model description format 0.5) is a zip archive
holding ``rdf.yaml`` and the files it names. The description says, for a consumer that has never heard
of unet (deepImageJ in Fiji, ilastik's neural network workflow, napari's bioimage.io plugin,
``bioimageio.core``):

- **the input**: axes batch, channel, y, x; which sides the network takes (:func:`size_rule`: the
  smallest side and the step between sides, ``netspec``'s rule: valid padding ``min + k * 2**depth``,
  same padding multiples of ``2**depth``); the raw pixel values as float32, normalised by the
  description's own **preprocessing** (:func:`preprocessing`), the model's rule of
  :mod:`unetcli.normalize` spelled the spec's way: per-image percentiles -> ``scale_range``, per-image
  z-score -> ``zero_mean_unit_variance``, the training set's mean and standard deviation ->
  ``fixed_zero_mean_unit_variance``;
- **the output**: the softmax probability of every class, each output side the input side plus an
  ``offset`` (minus twice the margin that unpadded convolutions consume: the spec's way to say "the
  model crops its own halo"); same-padding networks give the input's size and declare a ``halo``, the
  border a tiling consumer should discard (:data:`SAME_HALO`; their smallest declared input then
  leaves a pixel inside it, :func:`described_min`);
- test tensors (a real image where there is one, :mod:`unetcli.export` makes them), a cover, the model
  card as documentation, the licence, citations (the U-Net paper, the training data of the shipped
  models), and unet's own records under ``config.unet``.

``rdf.yaml`` is written as JSON, which is YAML too: no YAML library is needed.

A library module: it never prints, and refuses with a one-line :class:`~unetcli.errors.ConfigError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from unetcli import normalize
from unetcli.errors import ConfigError
from unetcli.netspec import UNetConfig, margin, output_size, smallest_input

FORMAT_VERSION = "0.5.4"
"""The model description format written. The fields used here are those of format 0.5.0 to 0.5.4, so
that consumers built on older 0.5 libraries (deepImageJ's JDLL, ilastik) read the package too."""

RDF_NAME = "rdf.yaml"
INPUT_ID, OUTPUT_ID = "raw", "probabilities"
TEST_INPUT, TEST_OUTPUT = "test_input.npy", "test_output.npy"
SAMPLE_INPUT, SAMPLE_OUTPUT = "sample_input.tif", "sample_output.tif"
COVER, DOCUMENTATION = "cover.png", "README.md"
ONNX_WEIGHTS, TORCHSCRIPT_WEIGHTS = "weights.onnx", "weights.torchscript.pt"
LICENSE = "MIT"
"""The licence of unet and of the packages it writes (the project's own). The training data of the
shipped models: DSB 2018 (BBBC038) is CC0; the ISBI 2012 data asks to cite its two papers."""

SAME_HALO = 16
"""Output pixels a same-padding network's tile should lose at each border when a consumer tiles an
image: the zero padding inside the network changes predictions near tile borders (unet itself
overlaps and blends tiles instead; see :mod:`unetcli.tiling`). Measured on the shipped ``nuclei``
model (128-pixel tiles of five DSB 2018 sample images against whole 256-pixel crops): the mean change
of a probability is 0.01-0.12 within 4 pixels of a tile's edge and falls, from about 16 pixels in, to
the 0.001-0.03 it keeps deep inside the tile (the network's context reaches 92 pixels each side, so no
halo short of that makes tiles exact). A multiple of 8 keeps a padded input a valid size."""

UNET_PAPER = {"text": "Ronneberger O, Fischer P, Brox T. U-Net: Convolutional Networks for Biomedical Image "
                      "Segmentation. MICCAI 2015, LNCS 9351, 234-241.",
              "doi": "10.1007/978-3-319-24574-4_28"}

ISBI_2012 = [
    {"text": "Arganda-Carreras I, Turaga SC, Berger DR, et al. Crowdsourcing the creation of image "
             "segmentation algorithms for connectomics. Frontiers in Neuroanatomy 9:142, 2015 (the ISBI 2012 "
             "challenge: training data).",
     "doi": "10.3389/fnana.2015.00142"},
    {"text": "Cardona A, Saalfeld S, Preibisch S, et al. An integrated micro- and macroarchitectural analysis of "
             "the Drosophila brain by computer-assisted serial section electron microscopy. PLoS Biology "
             "8(10):e1000502, 2010 (the ISBI 2012 images).",
     "doi": "10.1371/journal.pbio.1000502"},
]
DSB_2018 = [
    {"text": "Caicedo JC, Goodman A, Karhohs KW, et al. Nucleus segmentation across imaging experiments: the 2018 "
             "Data Science Bowl. Nature Methods 16:1247-1253, 2019 (BBBC038v1: training data, CC0).",
     "doi": "10.1038/s41592-019-0612-7"},
]

SHIPPED = {
    "em-membranes": {"cite": ISBI_2012,
                     "tags": ["electron-microscopy", "cell-membrane", "brain", "isbi2012"]},
    "nuclei": {"cite": DSB_2018,
               "tags": ["fluorescence-light-microscopy", "transmission-light-microscopy", "nuclei",
                        "instance-segmentation", "dsb2018"]},
}
"""What the shipped models' files cannot say about themselves: their training data's citations and
the bioimage.io tags of their modality and content."""

BASE_TAGS = ["unet", "2d", "pytorch", "onnx", "torchscript", "semantic-segmentation"]


# ------------------------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class SizeRule:
    """Which input sides a network takes and what it returns: ``min + k * step`` (k = 0, 1, ...) in,
    each side ``in + offset`` out (``offset`` = -2 x margin for valid padding, 0 for same)."""

    min: int
    step: int
    offset: int

    def text(self) -> str:
        sides = (f"multiples of {self.step}" if self.min == self.step
                 else f"{self.min} + {self.step}*k pixels (k = 0, 1, 2, ...)")
        out = ("the same size" if self.offset == 0 else
               f"{-self.offset} pixels smaller ({-self.offset // 2} each side: the context its unpadded "
               f"convolutions consume)")
        return f"input height and width: {sides}; output: {out}"


def size_rule(config: UNetConfig) -> SizeRule:
    """The network's input sides and output offset, from ``netspec``'s size rules."""
    lo = smallest_input(config)
    step = 2 ** config.depth
    for k in (0, 1, 2):   # the rule holds for every side: the offset is the same, every step is valid
        side = lo + k * step
        out = output_size(config, side)
        if out is None or out - side != -2 * margin(config) or output_size(config, side + 1) is not None:
            raise ConfigError(f"input sides of this network do not follow min + k*step (side {side})")
    return SizeRule(lo, step, -2 * margin(config))


def described_min(rule: SizeRule) -> int:
    """The smallest input side the description declares: the network's, or for a same-padding network
    (whose output declares a halo) the smallest side that keeps a pixel inside the halo on both sides."""
    if rule.offset:
        return rule.min
    return rule.min + max(0, (2 * SAME_HALO - rule.min) // rule.step + 1) * rule.step


def tensor_side(config: UNetConfig, available: int, cap: int = 512) -> int:
    """The side of a square test tensor cut from an image ``available`` pixels on its shorter side:
    the largest valid side within it and ``cap``, or the smallest valid side (the image then mirrored)."""
    rule = size_rule(config)
    low = described_min(rule)
    top = min(available, cap)
    if top < low:
        return low
    return low + (top - low) // rule.step * rule.step


# ----------------------------------------------------------------------------------- normalisation

def preprocessing(norm: dict) -> list[dict]:
    """The model's normalisation (``normalize``'s record) as the spec's preprocessing of the raw input.

    Per image and channel (axes y and x reduced), as ``unet predict`` normalises a single image."""
    kind = normalize.kind(norm)
    if kind == "percentile":
        low, high = float(norm["low"]), float(norm["high"])
        if high <= 1.0:
            raise ConfigError(f"percentile normalisation {low:g}-{high:g}: bioimage.io's scale_range takes an "
                              "upper percentile above 1", hint="train with percentiles such as 1,99.8")
        return [{"id": "scale_range",
                 "kwargs": {"axes": ["y", "x"], "min_percentile": low, "max_percentile": high}}]
    if kind == "zscore":
        return [{"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"]}}]
    mean = [float(v) for v in norm["mean"]]
    std = [float(v) for v in norm["std"]]
    if min(std) < 1e-6:
        raise ConfigError(f"dataset normalisation with a standard deviation of {min(std):g}: bioimage.io's "
                          "fixed_zero_mean_unit_variance takes 1e-6 and more")
    return [{"id": "fixed_zero_mean_unit_variance", "kwargs": {"axis": "channel", "mean": mean, "std": std}}]


def normalisation_text(norm: dict, trained_dtype: str | None = None) -> str:
    """The normalisation in words, for the documentation and the exported files' metadata."""
    kind = normalize.kind(norm)
    if kind == "percentile":
        lo, hi = f"{norm['low']:g}", f"{norm['high']:g}"
        return (f"each image and channel mapped so that its percentile {lo} becomes 0 and its percentile {hi} "
                f"becomes 1: x' = (x - p{lo}) / (p{hi} - p{lo})")
    if kind == "zscore":
        return "each image and channel minus its mean, divided by its standard deviation"
    unit = f" of {trained_dtype} pixel values" if trained_dtype else ""
    return (f"x' = (x - mean) / std per channel with the training set's mean {norm['mean']} and standard "
            f"deviation {norm['std']}{unit}")


# ------------------------------------------------------------------------------------------ the rdf

def package_name(name: str) -> str:
    """A name bioimage.io takes: letters, digits, ``_+- ()``, 5 to 64 characters."""
    clean = re.sub(r"[^A-Za-z0-9_+\- ()]+", "-", name).strip(" -") or "model"
    if len(clean) < 5:
        clean = f"U-Net {clean}"
    return clean[:64]


def channel_names(config: UNetConfig) -> list[str]:
    if config.in_channels == 1:
        return ["grey"]
    if config.in_channels == 3:
        return ["red", "green", "blue"]
    return [f"channel{i + 1}" for i in range(config.in_channels)]


def _axes(config: UNetConfig, names: list[str], size) -> list[dict]:
    return [{"type": "batch"}, {"type": "channel", "channel_names": names},
            {"type": "space", "id": "y", **size("y")}, {"type": "space", "id": "x", **size("x")}]


def _file(name: str, digests: dict[str, str]) -> dict:
    return {"source": name, "sha256": digests[name]}


def describe(model, *, name: str, description: str, digests: dict[str, str], authors: list[str],
             opset: int, torch_version: str, records: dict, timestamp: str, shipped: str | None) -> dict:
    """The content of ``rdf.yaml`` for ``model`` (a ``checkpoint.ModelFile``).

    ``digests``: SHA-256 of every file the package holds besides rdf.yaml (the names above);
    ``records``: unet's own records, stored under ``config.unet``; ``shipped``: the name of the shipped
    model this file is (its citations and tags), or None."""
    config = model.config
    rule = size_rule(config)
    known = SHIPPED.get(shipped or "", {})

    def in_size(_axis: str) -> dict:
        return {"size": {"min": described_min(rule), "step": rule.step}}

    def out_size(axis: str) -> dict:
        size = {"size": {"tensor_id": INPUT_ID, "axis_id": axis, "offset": rule.offset}}
        return size if rule.offset else {**size, "halo": SAME_HALO}

    trained = (model.inputs or {}).get("dtype")
    picked = (model.inputs or {}).get("channels")
    in_text = f"raw image, float32; {config.in_channels} channel(s)"
    if picked:
        in_text += f" (channels {','.join(str(c) for c in picked)} of the training images)"
    return {
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": package_name(name),
        "description": description[:512],
        "authors": [{"name": a} for a in authors],
        "cite": [UNET_PAPER, *known.get("cite", [])],
        "license": LICENSE,
        "tags": BASE_TAGS + list(known.get("tags", [])),
        "documentation": _file(DOCUMENTATION, digests),
        "covers": [_file(COVER, digests)],
        "timestamp": timestamp,
        "inputs": [{
            "id": INPUT_ID,
            "description": in_text[:128],
            "axes": _axes(config, channel_names(config), in_size),
            "test_tensor": _file(TEST_INPUT, digests),
            "sample_tensor": _file(SAMPLE_INPUT, digests),
            "data": {"type": "float32"},
            "preprocessing": preprocessing(model.normalization),
        }],
        "outputs": [{
            "id": OUTPUT_ID,
            "description": "softmax probability of each class (the channels, in the model's class order)",
            "axes": _axes(config, list(model.class_names), out_size),
            "test_tensor": _file(TEST_OUTPUT, digests),
            "sample_tensor": _file(SAMPLE_OUTPUT, digests),
            "data": {"type": "float32", "range": [0.0, 1.0]},
        }],
        "weights": {
            "torchscript": {**_file(TORCHSCRIPT_WEIGHTS, digests), "pytorch_version": torch_version,
                            "comment": "traced by unet export from the .unet file's network, softmax included"},
            "onnx": {**_file(ONNX_WEIGHTS, digests), "opset_version": int(opset), "parent": "torchscript",
                     "comment": "exported by unet export (torch.onnx, dynamic batch, height and width) "
                                "from the same network as the torchscript weights"},
        },
        "config": {"unet": {**records, "input_sizes": rule.text(),
                            "normalization_text": normalisation_text(model.normalization, trained)}},
    }


def rdf_text(description: dict) -> str:
    """``rdf.yaml``'s text: JSON, a subset of YAML that every YAML reader takes."""
    return json.dumps(description, indent=2, ensure_ascii=True) + "\n"


# ------------------------------------------------------------------------------------------- pictures

def cover(image: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """An RGB uint8 picture: the normalised input (``(H, W, C)``, shown between 0 and 1) beside the
    prediction (``(K, H, W)`` probabilities: the foreground probability in grey for two classes, the
    most probable class in colours otherwise), of the same size."""
    img = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    img = img[..., :3] if img.shape[-1] >= 3 else np.repeat(img[..., :1], 3, axis=-1)
    left = np.rint(img * 255).astype(np.uint8)
    if probs.shape[0] == 2:
        right = np.repeat(np.rint(np.clip(probs[1], 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    else:
        palette = np.array([[0, 0, 0], [230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66],
                            [0, 114, 178], [213, 94, 0], [204, 121, 167]], np.uint8)
        right = palette[np.argmax(probs, axis=0) % len(palette)]
    return np.concatenate([left, right], axis=1)


def documentation(card: str | None, *, name: str, model, rule_text: str, norm_text: str,
                  verified: list[str]) -> str:
    """README.md of the package: the model card (or a card made from the file's records) and a section
    on how the package's tensors are to be read."""
    config = model.config
    if card is None:
        prov = model.provenance or {}
        lines = [f"# {name}", "", f"A U-Net trained with `unet train` (unet {prov.get('unet_version', '?')}).", "",
                 "| | |", "| --- | --- |",
                 f"| network | depth {config.depth}, base width {config.base}, {config.padding} padding, "
                 f"batch norm {'on' if config.batchnorm else 'off'} |",
                 f"| input | {config.in_channels} channel(s) |",
                 f"| classes | {', '.join(model.class_names)} |",
                 f"| created | {prov.get('created', 'unknown')} |"]
        if prov.get("command"):
            command = prov["command"] if isinstance(prov["command"], str) else " ".join(map(str, prov["command"]))
            lines += ["", "Trained with:", "", "```sh", command, "```"]
        card = "\n".join(lines) + "\n"
    section = ["", "## This bioimage.io package", "",
               f"Written by `unet export` from the model file `{model.path.name if model.path else name}` "
               f"(SHA-256 `{model.sha256 or 'unknown'}`).", "",
               f"- Input `{INPUT_ID}`: raw pixel values as float32, axes batch, channel, y, x; {rule_text}.",
               f"- Normalisation (the package's preprocessing): {norm_text}.",
               f"- Output `{OUTPUT_ID}`: the softmax probability of each class ({', '.join(model.class_names)}).",
               "- Weights: TorchScript and ONNX (opset 18), the same network with the softmax included.",
               "- `unet predict` computes the same probabilities with the overlap-tile strategy and mirrored "
               "borders for images of any size; a consumer of this package cuts tiles of the sizes above itself.",
               ]
    section += ["", "## Validation", "",
                "Checked by `unet export` when the package was written: "
                + ("; ".join(verified) if verified else "nothing beyond the description") + ". "
                "The test tensors are the network's own output on the test input; `bioimageio test` (from "
                "`bioimageio.core`) reproduces them with each weights format and runs inputs of several sizes. "
                "Scores on held-out data, where the model has them, are in the model card above."]
    return card.rstrip("\n") + "\n" + "\n".join(section) + "\n"
