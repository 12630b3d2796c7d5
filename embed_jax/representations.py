"""A representation: what a model outputs for a text, and how two outputs are scored.

The objective embeds its text groups through it (`embed`, inside the jitted step) and its losses
score with `score`; the evaluator encodes a corpus and its queries through it and searches them
with its indexes (`encode`, `indexes`); the exporter writes its folder (`export`). A new kind of
embedding is one more class here, a head on the encoder and a score function; nothing else in
the trainer or the evaluator changes.

    dense   one vector per text (pooling, optional Dense head), cosine similarity
    next    token vectors (MaxSim), vocabulary weights (sparse dot), pair scores (cross-encoder)

    rep = representations.get(config)          # the config's (config.representation)
    out_BxE = rep.embed(module, params, {"ids": ids_BxL, "mask": mask_BxL}, train=False)
    scores_BxC = rep.score.matrix(q_BxE, d_CxE)
"""

from __future__ import annotations

import jax

from embed_jax import losses
from embed_jax.models import SentenceEncoder


class Dense:
  """One vector per text: the pooled encoder output through the model's Dense head, if any;
  cosine similarity. Outputs are raw (unnormalised): the score normalises, so a Matryoshka
  prefix is re-normalised as a truncated embedding is."""
  name = "dense"
  score = losses.COSINE
  similarity = "cosine"  # the name results and exports give the score

  def __init__(self, layers: tuple[int, ...] = ()):
    # 2D Matryoshka: also the pooled output after these layers (1-based counts).
    self.layers = tuple(layers)

  # ---- in the step ----

  def embed(self, module: SentenceEncoder, params, group: dict, *, train: bool,
            dropout_rng=None, **_) -> jax.Array:
    """Vectors [..., E] of a text group {"ids": [..., L], "mask": [..., L]}; with `layers`,
    [..., 1 + K, E]: after the last layer (index 0), then after each of `layers`."""
    ids, mask = group["ids"], group["mask"]
    flat = (ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1]))
    kw = {"rngs": {"dropout": dropout_rng}} if train else {}
    if self.layers:
      out = module.apply({"params": params}, *flat, self.layers, deterministic=not train,
                         method=SentenceEncoder.embed_layers, **kw)
    else:
      out = module.apply({"params": params}, *flat, deterministic=not train, normalize=False, **kw)
    return out.reshape(*ids.shape[:-1], *out.shape[1:])

  def at_layer(self, out: jax.Array, index: int) -> jax.Array:
    """The output after one of the embedded layers (0: the last), without the layer axis."""
    return out[..., index, :] if self.layers else out

  prefix = staticmethod(losses.truncate)  # Matryoshka: the first d dims

  # ---- outside the step: encode, search, export ----

  def encode(self, model, texts, *, batch_size: int = 32, show_progress=None):
    """float32 [n, E] raw vectors of `texts` (an embed_jax.Embedder), in input order."""
    return model.encode(texts, batch_size=batch_size, normalize=False, show_progress=show_progress)

  def indexes(self, precisions=("float32",), rescore: int = 0) -> list:
    """Exact search over the corpus vectors at each precision (embed_jax.evaluate), and binary
    re-scored with the float query when `rescore` > 0."""
    from embed_jax import evaluate
    out = [evaluate.dense_index(p) for p in precisions]
    if rescore and "binary" in precisions:
      out.append(evaluate.Binary(rescore))
    return out

  def export(self, params, model_config, tokenizer, out_dir, *, base_model=None):
    """A sentence-transformers folder (transformers.AutoModel loads its encoder)."""
    from embed_jax.checkpoint import export
    return export(params, model_config, tokenizer, out_dir, base_model=base_model)


REPRESENTATIONS = {"dense": Dense}


def get(config) -> Dense:
  """The representation a training config asks for (`config.representation`)."""
  if config.representation not in REPRESENTATIONS:
    raise ValueError(f"representation={config.representation!r}: choose from "
                     f"{', '.join(REPRESENTATIONS)}")
  return REPRESENTATIONS[config.representation](layers=tuple(config.matryoshka.layers))
