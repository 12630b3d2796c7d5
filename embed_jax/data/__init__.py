"""Data: BEIR-format datasets through TFDS (array_record, no TensorFlow)."""

from embed_jax.data.beir import (BEIR_DATASETS, BeirBuilder, BeirDataset, BeirFormatError,
                                 BeirSource, load_beir, resolve_beir)

__all__ = ["BEIR_DATASETS", "BeirBuilder", "BeirDataset", "BeirFormatError", "BeirSource",
           "load_beir", "resolve_beir"]
