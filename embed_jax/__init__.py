"""embed_jax: fine-tune text embedding models in JAX/Flax.

    import embed_jax
    model = embed_jax.load("sentence-transformers/all-MiniLM-L6-v2")  # or a local folder
    vectors = model.encode(["a text", "another"])                     # float32 [2, 384]
    model.save("exports/minilm")                                       # sentence-transformers folder
"""

__version__ = "0.1.0"

from embed_jax.checkpoint import export
from embed_jax.embedder import Embedder, load
from embed_jax.models import ModelConfig

__all__ = ["load", "export", "Embedder", "ModelConfig", "__version__"]
