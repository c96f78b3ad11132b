"""unet: the U-Net of Ronneberger, Fischer and Brox (2015) as a command-line tool.

This module holds the version only, so that ``unet --help`` stays fast (it must not import torch).
"""

__version__ = "0.1.0"
