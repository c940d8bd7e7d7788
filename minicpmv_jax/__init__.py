"""minicpmv-jax: MiniCPM-V vision-language models (2.5, 2.6, 4.5) in JAX/Flax.

Public names are imported lazily so that `import minicpmv_jax` stays cheap (the processor needs
no JAX at all).
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "MiniCPMV": "minicpmv_jax.pipeline",
    "MiniCPMVConfig": "minicpmv_jax.config",
    "MiniCPMVProcessor": "minicpmv_jax.processor",
    "ProcessorOutput": "minicpmv_jax.processor",
    "MiniCPMVError": "minicpmv_jax.errors",
    "Buckets": "minicpmv_jax.batching",
    "RequestShape": "minicpmv_jax.generate",
}

__all__ = [  # noqa: RUF022 (grouped: classes, then errors, then the version)
    "MiniCPMV",
    "MiniCPMVConfig",
    "MiniCPMVProcessor",
    "ProcessorOutput",
    "Buckets",
    "RequestShape",
    "MiniCPMVError",
    "__version__",
]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'minicpmv_jax' has no attribute {name!r}")
