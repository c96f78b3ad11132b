"""Draw the README's picture of the shipped example: the EM slice with the predicted membranes in red.

    python docs/example_figure.py pretrained/examples/isbi-test-00.png \
        pretrained/examples/isbi-test-00-mask.png docs/example-mask.png
"""

from __future__ import annotations

import sys

import numpy as np

from unetcli.images import read_image, write_image


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB uint8: the grey image, and membrane pixels (class 0) blended 60% toward pure red."""
    grey = image[..., 0].astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    membrane = mask == 0
    rgb[membrane] = 0.4 * rgb[membrane] + 0.6 * np.array([255.0, 0.0, 0.0])
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    image = read_image(argv[0])[0]
    mask = read_image(argv[1])[0, ..., 0]
    write_image(argv[2], overlay(image, mask), "YXC")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
