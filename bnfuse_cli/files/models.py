"""Turn a model name into an ``nn.Module``: torchvision names (with their pretrained weights),
``timm:NAME`` and ``package.module:factory`` for the user's own code."""

from __future__ import annotations

import contextlib
import difflib
import importlib
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import SourceError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["build", "torchvision_names", "load_weights_enum", "own_init_only"]


def torchvision_names() -> list[str]:
    """Every torchvision model name (classification, segmentation, detection, video, ...)."""
    from torchvision import models

    return sorted(models.list_models())


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def _build_torchvision(name: str, weights: "str | None", kwargs: dict[str, Any]) -> "nn.Module":
    from torchvision import models

    names = torchvision_names()
    if name not in names:
        raise SourceError(
            f"unknown model {name!r}: it is neither a torchvision model name nor an existing file."
            f"{_suggest(name, names)} Use timm:NAME for timm models or package.module:factory for your own code."
        )
    if name in ("googlenet", "inception_v3") and weights is None:
        kwargs = {"init_weights": True, **kwargs}
    try:
        return models.get_model(name, weights=weights, **kwargs)
    except (OSError, RuntimeError) as exc:  # download failed (offline) or a corrupt cache
        if weights is None:
            raise
        raise SourceError(_weights_error(name, weights, exc)) from exc


def _weights_error(name: str, weights: str, exc: Exception) -> str:
    import torch

    where = f"{torch.hub.get_dir()}/checkpoints"
    return (
        f"could not get the {weights} pretrained weights of {name}: they are not in the torch hub cache "
        f"({where}) and downloading them failed ({type(exc).__name__}: {exc}). On a machine with no "
        "network, copy the weights file into that folder, pass --weights FILE with a local state_dict, "
        "or --weights none for random initialisation."
    )


def load_weights_enum(name: str, weights: str) -> Any:
    """The torchvision weights enum member for ``weights`` ('default' or e.g. IMAGENET1K_V2)."""
    from torchvision import models

    try:
        enum = models.get_model_weights(name)
    except (ValueError, KeyError) as exc:
        raise SourceError(f"torchvision has no pretrained weights for {name!r}") from exc
    key = "DEFAULT" if weights.lower() == "default" else weights
    try:
        return enum[key] if "." not in key else enum[key.rsplit(".", 1)[-1]]
    except KeyError as exc:
        members = [w.name for w in enum]
        raise SourceError(
            f"{name} has no weights {weights!r}: choose one of default, {', '.join(members)}, none, or a file"
        ) from exc


def own_init_only(arch: str) -> bool:
    """Whether ``arch`` has no pretrained weights bnfuse can load, only its own initialisation:
    ``timm:NAME`` (bnfuse does not download timm's weights) and ``package.module:factory``."""
    return ":" in arch


def build(arch: str, *, weights: "str | None" = None, seed: int = 0, **kwargs: Any) -> "nn.Module":
    """Instantiate ``arch``: a torchvision name, ``timm:NAME``, or ``package.module:callable``.

    ``weights`` is a torchvision weights name (``default``, ``IMAGENET1K_V2``) or None for
    random initialisation; timm and factory models are always built without pretrained weights.
    Whatever is initialised at random is drawn from ``seed`` (torch's, Python's and numpy's global
    random states, each left as it was), so the same name and seed give the same model in every process.
    """
    import torch

    with torch.random.fork_rng(devices=[]), _seeded_python_and_numpy(seed):
        torch.manual_seed(seed)
        if arch.startswith("timm:"):
            return _build_timm(arch, kwargs)
        if ":" in arch:
            return _build_factory(arch, kwargs)
        resolved = None
        if weights is not None:
            names = torchvision_names()
            if arch not in names:  # say "unknown model", not "no pretrained weights"
                return _build_torchvision(arch, None, dict(kwargs))
            resolved = load_weights_enum(arch, weights)
        return _build_torchvision(arch, resolved, dict(kwargs))


@contextlib.contextmanager
def _seeded_python_and_numpy(seed: int) -> Iterator[None]:
    """Python's and numpy's global random states seeded with ``seed`` inside, restored after: a factory
    that draws its initialisation from them is as reproducible as one that uses torch's."""
    import random
    import sys

    np = sys.modules.get("numpy")  # torch imports it when it is installed
    state, np_state = random.getstate(), np.random.get_state() if np is not None else None
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(state)
        if np is not None:
            np.random.set_state(np_state)


def _build_timm(arch: str, kwargs: dict[str, Any]) -> "nn.Module":
    try:
        import timm
    except ImportError as exc:
        raise SourceError(
            f"{arch} needs timm, which is not installed: pip install 'bnfuse[timm]' (or pip install timm)"
        ) from exc
    name = arch[5:]
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        raise SourceError(
            f"timm has no model {name!r}.{_suggest(name, timm.list_models())} ({exc})"
        ) from exc


def _build_factory(arch: str, kwargs: dict[str, Any]) -> "nn.Module":
    """``package.module:callable`` called without arguments (the current directory is searched, as by
    ``python -m``), checked to return an ``nn.Module``."""
    import os
    import sys

    module_name, _, attr = arch.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` would: user code in cwd
        sys.path.insert(0, os.getcwd())
    if not module_name or not attr:
        raise SourceError(
            f"--arch {arch!r} is not of the form package.module:callable (for example mypkg.models:Net)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SourceError(
            f"cannot import {module_name!r} for --arch {arch}: {exc}. Make sure the package is "
            "installed or on PYTHONPATH (the current directory is searched too)"
        ) from exc
    except Exception as exc:  # the user's module raised while importing: their code, not ours
        raise SourceError(
            f"importing {module_name!r} for --arch {arch} failed: {type(exc).__name__}: {exc}"
        ) from exc
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise SourceError(f"{module_name} has no attribute {attr!r} (from --arch {arch})")
    if not callable(factory):
        raise SourceError(f"{arch} is not callable: point --arch at a model class or factory function")
    return _call_factory(arch, factory, kwargs)


def _call_factory(arch: str, factory: Any, kwargs: dict[str, Any]) -> "nn.Module":
    try:
        model = factory(**kwargs)
    except Exception as exc:  # a factory needing arguments, or failing in the user's code
        raise SourceError(
            f"calling {arch}() to build the model failed: {type(exc).__name__}: {exc}. bnfuse calls it "
            "without arguments: point --arch at a function that returns the model ready to load weights"
        ) from exc
    from torch import nn

    if not isinstance(model, nn.Module):
        raise SourceError(f"{arch}() returned {type(model).__name__}, not a torch.nn.Module")
    return model
