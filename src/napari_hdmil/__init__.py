"""napari-hdmil: the napari plugin over the ``hdmil`` model package.

Readers, the classification widget, layers built from a pipeline result, sample data and writers.
All logic lives in ``hdmil``; this package only shows it.
"""

__version__ = "0.1.0"
