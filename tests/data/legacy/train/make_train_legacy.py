"""Write the legacy DMIN run beside this file with the code from BEFORE the training loop moved
to hdmil.train.loop (its flat TrainConfig, its own resume files). Run it from a checkout of that
code:

    cd <old checkout> && PYTHONPATH=src python <this file>

It trains DMIN for 2 epochs on ``tests/test_train.make_cohort(n_bags=12)`` and keeps what an
interrupted run leaves: ``dmin.safetensors``, ``last.safetensors``, ``state.json``, ``log.csv``.
``tests/test_train.py::test_a_run_of_the_previous_code_resumes`` resumes it with today's code.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(Path.cwd() / "tests"))

from test_train import make_cohort  # noqa: E402

from hdmil.train.data import load_cohort  # noqa: E402
from hdmil.train.dmin_trainer import TrainConfig, train_dmin  # noqa: E402
from hdmil.train.splits import Split  # noqa: E402

CONFIG = dict(hidden=16, attn_dim=8, k_sample=4, device="cpu", lr=1e-3, min_epochs=0,
              max_epochs=2, lipn_recall=0.97, lipn_targets="soft")
TRAIN = tuple(f"slide_{i:03d}" for i in range(8))
VAL = tuple(f"slide_{i:03d}" for i in range(8, 12))

if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        labels, feats, _ = make_cohort(Path(tmp), n_bags=12)
        cohort = load_cohort(labels, feats)
        out = Path(tmp) / "run"
        train_dmin(cohort, Split(TRAIN, VAL, (), fold=0), TrainConfig(**CONFIG), out)
        for name in ("dmin.safetensors", "last.safetensors", "state.json", "log.csv"):
            shutil.copy(out / name, HERE / name)
    print("written to", HERE)
