"""napari-hdmil: the napari plugin over the ``hdmil`` model package.

Readers, the classification widget, layers built from a pipeline result, sample data and writers.
All logic lives in ``hdmil``; this package only shows it.
"""

import os
import sys

# napari's canvas under Mesa (llvmpipe) loads Mesa's LLVM; loading triton's own bundled LLVM after
# it kills the process, and CUDA builds of torch import triton lazily the first time timm or
# torchvision pull in torch._dynamo, i.e. when the widget first builds an encoder. The plugin never
# compiles kernels, so inside napari torch is told triton is absent (HDMIL_ALLOW_TRITON=1 opts out).
if "triton" not in sys.modules and not os.environ.get("HDMIL_ALLOW_TRITON"):
    sys.modules["triton"] = None

__version__ = "0.1.0"
