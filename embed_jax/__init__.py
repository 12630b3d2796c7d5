"""embed_jax: fine-tune text embedding models in JAX/Flax.

    import embed_jax
    model = embed_jax.load("sentence-transformers/all-MiniLM-L6-v2")  # or a local folder
    vectors = model.encode(["a text", "another"])                     # float32 [2, 384]
    model.save("exports/minilm")                                       # sentence-transformers folder
"""

__version__ = "0.1.0"

__all__ = ["load", "export", "Embedder", "ModelConfig", "__version__"]

# Imported on first use, so that `import embed_jax.cli` (and `embed-jax --help`) does not load
# JAX and Flax.
_LAZY = {"load": "embed_jax.embedder", "Embedder": "embed_jax.embedder",
         "export": "embed_jax.checkpoint", "ModelConfig": "embed_jax.models"}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'embed_jax' has no attribute {name!r}")
