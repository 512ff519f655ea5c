"""genaf: secure fine-tuning of pre-trained encoders against downstream-agnostic adversarial examples."""

__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, DataError, GenafError, SpecError  # noqa: E402

__all__ = [
    "__version__",
    "GenafError",
    "SpecError",
    "CheckpointError",
    "DataError",
    "ConfigError",
    "load_encoder",
    "load_dataset",
    "load_model",
    "finetune",
    "craft",
    "evaluate",
    "export",
    "attacks",
]


def __getattr__(name: str):  # lazy, so `import genaf` stays cheap
    if name in ("load_encoder", "load_dataset", "load_model", "finetune", "evaluate", "craft", "export"):
        from . import api

        return getattr(api, name)
    if name == "attacks":  # genaf.attacks.PGD(...) without importing the subpackage first
        import importlib

        return importlib.import_module(".attacks", __name__)
    raise AttributeError(name)
