"""Models trained by the unet project itself, shipped so that `unet predict` works offline.

Each model is ``NAME.unet`` with its model card ``NAME.md``; `unet predict --model NAME` finds them.
"""
