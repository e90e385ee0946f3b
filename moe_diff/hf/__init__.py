"""moe-diff models as Hugging Face transformers models (model_type 'moe_diff'): the config and model classes, the
tokenizer files, the `export --format hf` writer, and registration with transformers' Auto classes.

`import moe_diff` registers the classes when transformers is imported (at once if it already is), so that
the package itself imports quickly and runs without transformers."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

CLASS_MODULES = ("moe_diff.hf.configuration", "moe_diff.hf.modeling")


def register() -> None:
    """AutoConfig and AutoModelForCausalLM learn model_type 'moe_diff': importing the modeling module registers
    both classes (AutoTokenizer needs nothing: exported directories name their tokenizer class)."""
    import moe_diff.hf.modeling  # noqa: F401


def being_imported(module: str) -> bool:
    """Whether `module` is part-way through its first import (it registers the classes itself when done)."""
    spec = getattr(sys.modules.get(module), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def register_or_warn() -> None:
    """register(), with a warning instead of an error: a transformers this package cannot serve must not stop
    transformers itself from importing."""
    try:
        register()
    except Exception as error:  # any incompatibility of another transformers version
        warnings.warn(f"moe_diff could not register its model with transformers' Auto classes: {error}",
                      stacklevel=2)


class RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is about to be imported, it lets the later finders find it and
    has the module's loader call register_or_warn() once the module has run."""

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name != "transformers":
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run_module = spec.loader.exec_module

            def run_then_register(module: ModuleType) -> None:
                run_module(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                if not any(being_imported(name) for name in CLASS_MODULES):  # else they register when done
                    register_or_warn()

            spec.loader.exec_module = run_then_register  # this spec's loader only
        return spec


def register_with_transformers() -> None:
    """Register now if transformers is imported, else as soon as it is."""
    if "transformers" in sys.modules:
        register_or_warn()
    elif not any(isinstance(finder, RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, RegisterOnImport())
