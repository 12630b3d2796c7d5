"""Every experiment config: its smoke variant passes the config checks, and the ones no other test
trains run end to end for two steps on the tiny model and a tiny BEIR folder."""

import pytest

from tests.conftest import REPO

SMOKE = {  # config file -> its smoke variant (the ones other tests train are marked)
    "scifact_mnrl": "smoke",  # test_train
    "scifact_hardneg": "smoke",  # test_train (mines first)
    "scifact_mrl": "smoke",
    "scifact_ff": "8,smoke",
    "scifact_mpnet_mnrl": "smoke",
    "scifact_distill": "smoke",
    "scifact_distill_mnrl": "smoke",
    "scifact_mlm": "smoke",  # test_tasks
    "scifact_mlm_then_mnrl": "smoke",
    "scifact_multitask": "smoke",  # test_tasks (needs the real STS-B and SNLI files)
    "scifact_colbert": "smoke",  # test_multivector
    "scifact_splade": "smoke",  # test_sparse
    "scifact_lexical": "smoke",  # test_sparse
    "scifact_reranker": "smoke",  # test_rerank
    "scifact_lora": "r4,smoke",  # test_lora (the smoke run of the base config's LoRA fields)
}
TRAINED_ELSEWHERE = {"scifact_mnrl", "scifact_hardneg", "scifact_mlm", "scifact_multitask",
                     "scifact_colbert", "scifact_splade", "scifact_lexical",
                     "scifact_reranker"}


def test_every_config_file_has_a_smoke_variant():
  files = {p.stem for p in (REPO / "configs").glob("scifact_*.py")}
  assert files == set(SMOKE), "add the new config's smoke variant to SMOKE"


@pytest.mark.parametrize("name", sorted(set(SMOKE) - TRAINED_ELSEWHERE))
def test_smoke_variant_trains(name, store, tmp_path, monkeypatch):
  from embed_jax import train as T
  from embed_jax.cli import load_config
  store_dir, beir = store
  monkeypatch.setenv("EMBED_JAX_CACHE", str(tmp_path / "tfds-cache"))
  over = [f"--config.data.dataset={beir}", "--config.max_steps=2", "--config.evals.test.at_end=False"]
  if "distill" in name:
    over.append(f"--config.distill.store={store_dir}")
  c = load_config(f"{REPO}/configs/{name}.py:{SMOKE[name]}", over)
  if "distill" in name:
    c.unlabelled.texts = "corpus+queries"  # the tiny folder's texts, all in the store
    c.unlabelled.batch_size = 8
  assert c.smoke
  out = T.train(c, tmp_path / "run")
  assert out["steps"] == 2 and (tmp_path / "run" / "export" / "model.safetensors").exists()
