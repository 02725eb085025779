"""HDMIL: hierarchical distillation multi-instance learning for whole-slide images.

The model package: slide I/O, tissue and patch grid, features, DMIN, LIPN, SLPD, training,
hierarchical inference and the ``hdmil`` command line. It never imports Qt or napari.
"""

from hdmil.errors import HDMILError

__version__ = "0.1.0"
__all__ = ["HDMILError", "__version__"]
