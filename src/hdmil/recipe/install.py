"""Installing a recipe's demo model into the package (what ``make model`` bundles)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hdmil.files import atomic_path
from hdmil.recipe.config import DEMO_NAME, RecipeError

__all__ = ["DEMO_FILES", "install_demo"]

DEMO_FILES = (f"{DEMO_NAME}.safetensors", f"{DEMO_NAME}-encoder.safetensors", f"{DEMO_NAME}.json")


def install_demo(
    out_dir: str | os.PathLike, assets_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Copy a recipe's three files into the package's assets (or ``assets_dir``)."""
    src = Path(out_dir)
    dst = Path(assets_dir) if assets_dir else Path(__file__).resolve().parents[1] / "assets"
    missing = [n for n in DEMO_FILES if not (src / n).exists()]
    if missing:
        raise RecipeError(f"{src}: no {', '.join(missing)}; run the recipe first")
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in DEMO_FILES:
        with atomic_path(dst / name) as tmp:  # a package never holds half a checkpoint
            shutil.copy2(src / name, tmp)
        (dst / name).chmod(0o644)  # package data: readable by every user of the install
        copied.append(dst / name)
    return copied
