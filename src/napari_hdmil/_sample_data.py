"""napari sample data: a synthetic H&E slide with a tumour area, generated on first use.

The slide (8192 x 8192 px at 0.5 µm/px, a fixed seed) is written once into the user cache
(``$HDMIL_CACHE``, else ``$XDG_CACHE_HOME/napari-hdmil``, else ``~/.cache/napari-hdmil``) by
``hdmil.synth.demo_slide_path`` -- the same function ``make demo`` uses -- and opened with this
plugin's reader, so the sample is exactly what File > Open gives for the file.
"""

from __future__ import annotations

from typing import Any

from hdmil.errors import HDMILError


def demo_slide() -> list[tuple[Any, dict[str, Any], str]]:
    """Layer data of the demo slide (made on first use, ~1 minute)."""
    from hdmil.synth import demo_slide_path
    from napari_hdmil._reader import get_reader

    path = demo_slide_path(create=True)
    reader = get_reader(str(path))
    if reader is None:
        raise HDMILError(f"{path}: the demo slide was written but cannot be read back")
    return reader(str(path))
