"""The model configuration: the encoder's shape plus the sentence-transformers pipeline around it."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken")  # concatenation order
# Dense head activations: ours -> the torch class sentence-transformers' Dense config names.
DENSE_ACTIVATIONS = {"identity": "torch.nn.modules.linear.Identity",
                     "tanh": "torch.nn.modules.activation.Tanh"}
# Position ids below the offset are not token positions: MPNet's start at padding_idx + 1 = 2.
POSITION_OFFSETS = {"mpnet": 2}
MPNET_BUCKETS = 32  # relative position buckets transformers' MPNet computes (max distance 128)
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "tanh")


@dataclasses.dataclass(frozen=True)
class LateInteraction:
  """A multi-vector (ColBERT / PyLate) model's settings: one vector per token, through a linear
  projection to `dims` (no bias by default), L2-normalised; scored by MaxSim. Queries and
  documents get a marker token after [CLS]; queries are padded with [MASK] to `query_length`
  (query augmentation), documents truncated to `document_length` with punctuation (the skiplist)
  left out of the score. The names and defaults are PyLate's."""
  dims: int = 128
  bias: bool = False
  query_prefix: str = "[Q] "
  document_prefix: str = "[D] "
  query_length: int = 32  # tokens, [CLS], the marker and [SEP] included
  document_length: int = 180
  do_query_expansion: bool = True  # pad queries with [MASK] to query_length
  attend_to_expansion_tokens: bool = False  # the [MASK]s are attended to by the encoder
  skiplist_words: tuple[str, ...] = tuple("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")

  def __post_init__(self):
    if self.dims < 1 or self.query_length < 4 or self.document_length < 4:
      raise ValueError(f"late interaction: dims {self.dims} must be >= 1 and the query and "
                       f"document lengths ({self.query_length}, {self.document_length}) >= 4")


SPARSE_HEADS = ("splade", "lexical")


@dataclasses.dataclass(frozen=True)
class SparseHead:
  """A sparse (vocabulary-sized) model's head.

  splade: the MLM head's logits at every token, log(1 + ReLU(logit)) (log1p_relu: once more
    log1p, as OpenSearch's models), max- (SPLADE v2, ++) or sum-pooled (SPLADE v1) over the
    tokens: sentence-transformers' MLMTransformer + SpladePooling.
  lexical: BGE-M3's learned lexical weights: ReLU(linear(token state)) -> one weight per token,
    each vocabulary entry the max over its occurrences; special tokens weigh nothing; no
    vocabulary expansion."""
  kind: str = "splade"
  pooling: str = "max"  # splade: max | sum
  activation: str = "relu"  # splade: relu | log1p_relu (sentence-transformers' names)

  def __post_init__(self):
    if self.kind not in SPARSE_HEADS or self.pooling not in ("max", "sum") or \
        self.activation not in ("relu", "log1p_relu"):
      raise ValueError(f"sparse head kind={self.kind!r} (choose {'/'.join(SPARSE_HEADS)}), "
                       f"pooling={self.pooling!r} (max/sum), activation={self.activation!r} "
                       f"(relu/log1p_relu)")


DECODERS = ("qwen2", "qwen3")  # causal-decoder families (embed_jax.models.decoder)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """A causal decoder's attention settings (Qwen2 / Qwen3): grouped-query attention with
  `num_kv_heads` key/value heads of `head_dim` dims, rotary embeddings with base `rope_theta`,
  query/key/value biases (Qwen2) or an RMSNorm of each query and key head (Qwen3)."""
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 1e6
  qkv_bias: bool = False
  o_bias: bool = False  # the output projection's bias (Qwen3 with attention_bias)
  qk_norm: bool = False
  tie_word_embeddings: bool = False  # kept for export (an embedder has no LM head)


CLASSIFIER_ACTIVATIONS = {"sigmoid": "torch.nn.modules.activation.Sigmoid",
                          "identity": "torch.nn.modules.linear.Identity"}


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A cross-encoder's head (Hugging Face `*ForSequenceClassification`) over the joined (query,
  document) pair: BERT's [CLS] pooler (dense + tanh), dropout and a linear map to `num_labels`
  logits; MPNet's classification head (dense + tanh on <s>, then out_proj). `activation` is what
  sentence-transformers' CrossEncoder.predict applies to the logits (sigmoid for one label)."""
  num_labels: int = 1
  activation: str = "sigmoid"  # sigmoid | identity (the logits)

  def __post_init__(self):
    if self.num_labels < 1 or self.activation not in CLASSIFIER_ACTIVATIONS:
      raise ValueError(f"classifier: num_labels={self.num_labels} must be >= 1 and activation="
                       f"{self.activation!r} one of {', '.join(CLASSIFIER_ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything needed to build the Flax module and to write the model back out.

  Hashable (it is a static attribute of the module); `hf_config` keeps the original config.json so
  that export writes back fields embed_jax does not interpret, and is left out of hashing.
  """

  architecture: str = "bert"  # config.json `model_type`: bert | mpnet
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  hidden_act: str = "gelu"  # "gelu" is the exact erf form, as in transformers
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  add_pooler: bool = True  # the [CLS] pooler (BERT, MPNet); unused by sentence embeddings, kept for export
  position_ids_buffer: bool = False  # write `embeddings.position_ids` on export (old checkpoints have it)
  relative_attention_num_buckets: int = 32  # MPNet: rows of the shared relative position bias table
  # sentence-transformers pipeline: Transformer -> Pooling -> [Normalize]
  pooling: tuple[str, ...] = ("mean",)
  dense_features: int = 0  # > 0: a Dense head after pooling (sentence-transformers' Dense module)
  dense_activation: str = "identity"  # identity | tanh (torch.nn.Identity / torch.nn.Tanh)
  dense_bias: bool = True
  normalize: bool = True
  max_seq_length: int = 256  # tokens, [CLS] and [SEP] included; longer texts are truncated
  do_lower_case: bool = False  # lower-case before tokenising (sentence_bert_config.json)
  matryoshka_dims: tuple[int, ...] = ()  # truncations the model was trained for (model card)
  # Named texts put before an input (sentence-transformers' prompts, e.g. Qwen3-Embedding's
  # ("query", "Instruct: ...\nQuery:")): ((name, text), ...); queries take "query" by default.
  prompts: tuple[tuple[str, str], ...] = ()
  # A multi-vector model (PyLate's pipeline: Transformer -> token Dense), instead of the
  # sentence-embedding pipeline above: its settings, or None.
  late_interaction: LateInteraction | None = None
  # A sparse model (SPLADE on the MLM head, or BGE-M3-style lexical weights): its head, or None.
  sparse: SparseHead | None = None
  # A cross-encoder (one score per joined query-document pair): its head, or None.
  classifier: Classifier | None = None
  # A causal decoder (architecture qwen2 | qwen3): its attention settings; layer_norm_eps is
  # its RMSNorm epsilon.
  decoder: Decoder | None = None
  dtype: str = "float32"  # compute dtype; "bfloat16" on TPU/GPU
  param_dtype: str = "float32"  # storage dtype of the parameters
  hf_config: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    bad = [m for m in self.pooling if m not in POOLING_MODES]
    if bad or not self.pooling:
      raise ValueError(f"pooling modes {list(self.pooling)} not supported; choose from {POOLING_MODES}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} not supported; choose from {ACTIVATIONS}")
    if self.dense_features < 0 or self.dense_activation not in DENSE_ACTIVATIONS:
      raise ValueError(f"Dense head: out_features {self.dense_features} must be >= 0 and the "
                       f"activation one of {sorted(DENSE_ACTIVATIONS)}, got {self.dense_activation!r}")
    if not 0 < self.max_seq_length <= self.max_tokens:
      reserved = (f" less the {self.position_offset} position ids {self.architecture} reserves"
                  if self.position_offset else "")
      raise ValueError(
          f"max_seq_length {self.max_seq_length} must be in 1..{self.max_tokens} "
          f"(max_position_embeddings {self.max_position_embeddings}{reserved})")
    if (self.architecture in DECODERS) != (self.decoder is not None):
      raise ValueError(f"architecture {self.architecture!r} and decoder settings "
                       f"{self.decoder} do not belong together: decoders {DECODERS} need them")
    if self.decoder is not None and self.num_heads % self.decoder.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of the decoder's "
                       f"{self.decoder.num_kv_heads} key/value heads")
    if self.architecture == "mpnet" and self.relative_attention_num_buckets < MPNET_BUCKETS:
      # transformers always computes 32 buckets, whatever the table size says.
      raise ValueError(f"relative_attention_num_buckets {self.relative_attention_num_buckets} must "
                       f"be >= {MPNET_BUCKETS} for mpnet")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"{name}={getattr(self, name)!r} is not a dtype (use float32 or bfloat16)") from e

  @property
  def position_offset(self) -> int:
    return POSITION_OFFSETS.get(self.architecture, 0)

  @property
  def max_tokens(self) -> int:
    """The longest input the position embeddings cover."""
    return self.max_position_embeddings - self.position_offset

  @property
  def pooled_dim(self) -> int:
    return self.hidden_size * len(self.pooling)

  @property
  def embedding_dim(self) -> int:
    return self.dense_features or self.pooled_dim

  def prompt(self, name: str | None) -> str:
    """The text of a named prompt ("" when the model has none of that name)."""
    return dict(self.prompts).get(name, "") if name else ""

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)
