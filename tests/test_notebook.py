"""notebooks/walkthrough.ipynb runs top to bottom (smoke mode: a tiny random model, a few steps,
a tiny BEIR folder), so the walk-through cannot rot."""

import json

from tests.conftest import REPO


def test_walkthrough_notebook_runs_in_smoke_mode(tiny_beir, tmp_path, monkeypatch):
  nb = json.loads((REPO / "notebooks" / "walkthrough.ipynb").read_text())
  assert nb["nbformat"] == 4 and all("id" in c for c in nb["cells"])
  monkeypatch.setenv("EMBED_JAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("EMBED_JAX_NOTEBOOK_DATASET", str(tiny_beir))
  monkeypatch.setenv("EMBED_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "nb"))
  monkeypatch.chdir(REPO / "notebooks")
  namespace: dict = {}
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), "walkthrough.ipynb", "exec"), namespace)
  assert namespace["summary"]["steps_run"] == 4
  assert (tmp_path / "nb" / "run" / "export" / "modules.json").exists()
