"""The one table between training options and config fields.

Each ``Option`` names a command-line flag, the config field it sets, how its text is parsed and
its help; ``key`` is its name in flat settings (the recipe's ``RecipeConfig``, the old flat
``TrainConfig`` dict). ``hdmil train-dmin`` / ``train-lipn`` build their flags with
``add_options`` and their configs with ``config_from_args``; the recipe builds its configs with
``config_from_settings``. Options that set the same field are alternatives (``--recall`` or
``--attention``): argparse refuses both at once, and so does ``config_from_settings``.

>>> cfg = config_from_settings(LIPNTrainConfig, LIPN_OPTIONS, {"lipn_attention": (0.85, 0.98)})
>>> cfg.calibration
AttentionShare(shares=(0.85, 0.98))
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hdmil.errors import HDMILError
from hdmil.train.config import (AttentionShare, DMINTrainConfig, KeptBudget, LIPNTrainConfig,
                                RecallShare)

__all__ = [
    "DMIN_OPTIONS",
    "LIPN_OPTIONS",
    "Option",
    "add_options",
    "config_from_args",
    "config_from_settings",
    "dmin_config_from_settings",
    "lipn_config_from_settings",
    "parse_rings",
    "parse_shares",
]


@dataclass(frozen=True)
class Option:
    """One option: ``flag`` sets config ``field``; ``type`` parses the flag's text (None with
    ``const``: a switch that sets ``const``); ``to_field`` turns the parsed value into the field's
    (default: as is)."""

    flag: str
    field: str
    help: str
    type: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple[Any, ...] | None = None
    const: Any = None
    to_field: Callable[[Any], Any] | None = None
    default_help: str | None = None  # how the default reads in --help; default: the field's
    key: str | None = None  # name in flat settings; default: the field's name

    @property
    def dest(self) -> str:
        """The argparse attribute: ``--keep-rate`` -> ``keep_rate``."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def setting(self) -> str:
        return self.key or self.field

    def value(self, parsed: Any) -> Any:
        return parsed if self.to_field is None else self.to_field(parsed)


def _per_class(cast: Callable[[str], Any], what: str) -> Callable[[str], tuple]:
    """An argparse type: "a,b,..." -> (cast(a), cast(b), ...), one value per class."""

    def parse(text: str) -> tuple:
        try:
            return tuple(cast(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None

    return parse


parse_rings = _per_class(int, "comma-separated ring counts")  # "0,1" -> (0, 1)


def parse_shares(text: str) -> float | tuple[float, ...]:
    """"0.95" -> 0.95 (every class); "0.85,0.98" -> one share per class."""
    values = _per_class(float, "a share or comma-separated shares")(text)
    return values[0] if len(values) == 1 else values


_SEED_HELP = "seed of the folds and of training"
_DEVICE = Option("--device", "device", "cpu, cuda, cuda:1 ...", str, default_help="auto")


def _common(prefix: str) -> tuple[Option, ...]:
    """Epochs, early stopping and Adam: the same flags for DMIN and LIPN."""
    return (
        Option("--epochs", "max_epochs", "maximum epochs", int, key=f"{prefix}max_epochs"),
        Option("--min-epochs", "min_epochs", "no early stop before this epoch", int,
               key=f"{prefix}min_epochs"),
        Option("--patience", "patience", "epochs without a better validation loss", int,
               key=f"{prefix}patience"),
        Option("--lr", "lr", "Adam learning rate", float, key=f"{prefix}lr"),
        Option("--weight-decay", "weight_decay", "Adam weight decay", float,
               key=f"{prefix}weight_decay"),
    )


DMIN_OPTIONS: tuple[Option, ...] = (
    Option("--instances", "instances", "MIL instances: patch features, or SLPD region embeddings",
           str, choices=("patch", "region")),
    *_common(""),
    Option("--keep-rate", "keep_rate", "target kept ratio r", float),
    Option("--cheby-degree", "cheby_degree", "CKA Chebyshev degree K", int),
    Option("--hidden", "hidden", "hidden width", int),
    Option("--attn-dim", "attn_dim", "attention width", int),
    Option("--k-sample", "k_sample", "instances per side in the clustering loss", int),
    Option("--inst-out-of-class", "inst_out_of_class", "with two classes too, the other branch's "
           "top instances as negatives in the clustering loss (CLAM's choice)", const=True),
    Option("--seed", "seed", _SEED_HELP, int),
    _DEVICE,
)

LIPN_OPTIONS: tuple[Option, ...] = (
    *_common("lipn_"),
    Option("--batch-patches", "batch_patches", "LR patches per step, whole slides", int,
           key="lipn_batch_patches"),
    Option("--recall", "calibration", "lower LIPN's threshold (from 0.5) until it keeps this "
           "share of the validation patches DMIN keeps, e.g. 0.97", float, metavar="SHARE",
           to_field=RecallShare, default_help="the paper's fixed 0.5", key="lipn_recall"),
    Option("--attention", "calibration", "instead of --recall: one threshold per class, the "
           "highest whose kept patches hold this share of DMIN's attention on the validation "
           "slides, e.g. 0.95, or one share per class in class order, e.g. 0.85,0.98",
           parse_shares, metavar="SHARE[,SHARE...]", to_field=AttentionShare,
           default_help="the paper's fixed 0.5", key="lipn_attention"),
    Option("--kept", "calibration", "instead of --recall / --attention: one threshold per class, "
           "chosen together to hold the most of DMIN's attention while LIPN keeps at most this "
           "share of each validation slide's patches on average (dilation included), e.g. 0.5",
           float, metavar="RATIO", to_field=KeptBudget, default_help="the paper's fixed 0.5",
           key="lipn_kept"),
    Option("--dilation", "dilation", "per class (in class order), rings of neighbouring patches "
           "that join each patch LIPN keeps for it, e.g. 0,1", parse_rings, metavar="R,R...",
           default_help="none", key="lipn_dilation"),
    Option("--soft-targets", "targets", "distil DMIN's scores σ(s/τ) instead of its 0/1 mask "
           "(same boundary)", const="soft", key="lipn_targets"),
    Option("--target-temperature", "target_temperature", "with --soft-targets: distil "
           "σ(s/(T·τ)), same boundary; T > 1 keeps the ranking of the patches DMIN scores far "
           "above it (say 3)", float, metavar="T", key="lipn_target_temperature"),
    Option("--match", "match", "how LIPN's output is compared with DMIN's: the paper's L1 or "
           "cross-entropy (with --soft-targets; ranks rare tumour patches higher)", str,
           choices=("l1", "bce"), key="lipn_match"),
    Option("--views", "views", "average LIPN's probabilities over this many orientations of each "
           "LR patch: 4 quarter turns, 8 with the mirror image (costs views x LIPN's small time, "
           "ranks uncertain patches more steadily)", int, choices=(1, 4, 8), key="lipn_views"),
    Option("--stain-jitter", "stain_jitter", "a random H&E stain change per training slide, e.g. "
           "1.0; helps when new slides are stained unlike the training slides", float,
           metavar="STRENGTH", default_help="0: off", key="lipn_stain_jitter"),
    Option("--seed", "seed", "training seed", int),
    _DEVICE,
)


def _default_text(option: Option, defaults: Any) -> str:
    if option.default_help is not None:
        return f": {option.default_help}"
    value = getattr(defaults, option.field)
    return f" {value:g}" if isinstance(value, float) else f" {value}"


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option], config_cls: type,
                **help_overrides: str) -> None:
    """Add ``options`` to ``parser`` (every default None: the config's default applies);
    ``help_overrides``: dest -> help text. Options for one field go in one exclusive group."""
    defaults = config_cls()
    fields = [o.field for o in options]
    groups: dict[str, Any] = {}
    for opt in options:
        target: Any = parser
        if fields.count(opt.field) > 1:
            if opt.field not in groups:
                groups[opt.field] = parser.add_mutually_exclusive_group()
            target = groups[opt.field]
        text = help_overrides.get(opt.dest, opt.help)
        kwargs: dict[str, Any] = {"dest": opt.dest, "default": None,
                                  "help": f"{text} (default{_default_text(opt, defaults)})"}
        if opt.type is None:
            kwargs.update(action="store_const", const=opt.const)
        else:
            kwargs.update(type=opt.type, metavar=opt.metavar, choices=opt.choices)
        target.add_argument(opt.flag, **kwargs)


def _config(config_cls: type, options: Sequence[Option], given: list[tuple[Option, Any]],
            fixed: Mapping[str, Any]) -> Any:
    values: dict[str, Any] = {}
    by_field: dict[str, Option] = {}
    for opt, parsed in given:
        if opt.field in by_field:
            raise HDMILError(f"{by_field[opt.field].setting} and {opt.setting} both set "
                             f"{config_cls.__name__}.{opt.field}: give one")
        by_field[opt.field] = opt
        values[opt.field] = opt.value(parsed)
    names = {f.name for f in dataclasses.fields(config_cls)}
    values.update({k: v for k, v in fixed.items() if k in names})
    return config_cls(**values)


def config_from_args(config_cls: type, options: Sequence[Option], args: argparse.Namespace,
                     **fixed: Any) -> Any:
    """``config_cls`` with the options given on the command line (None: the default), then
    ``fixed`` (field -> value)."""
    given = [(o, getattr(args, o.dest)) for o in options if getattr(args, o.dest, None) is not None]
    return _config(config_cls, options, given, fixed)


def config_from_settings(config_cls: type, options: Sequence[Option],
                         settings: Mapping[str, Any], **fixed: Any) -> Any:
    """``config_cls`` from flat settings keyed by ``Option.key`` (values as the flags parse them;
    None or missing: the default), then ``fixed`` (field -> value)."""
    given = [(o, settings[o.setting]) for o in options if settings.get(o.setting) is not None]
    return _config(config_cls, options, given, fixed)


def dmin_config_from_settings(settings: Mapping[str, Any], **fixed: Any) -> DMINTrainConfig:
    return config_from_settings(DMINTrainConfig, DMIN_OPTIONS, settings, **fixed)


def lipn_config_from_settings(settings: Mapping[str, Any], **fixed: Any) -> LIPNTrainConfig:
    return config_from_settings(LIPNTrainConfig, LIPN_OPTIONS, settings, **fixed)
