"""Faults and bad input, as a new user meets them: each is refused with one line that names the
problem (and the fix) before any compute, and nothing already written is lost."""

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embed_jax.cli import main
from tests.conftest import REPO

CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("scifact_*.py"))


def _one_line_error(capsys, *needles):
  """The CLI's stderr is one line (no traceback) holding each needle."""
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "Traceback" not in err, err
  for needle in needles:
    assert needle in err, err
  return err


def _tree(folder: Path) -> dict:
  """{relative path: sha256} of every file below `folder`."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


def _blocked(tmp_path) -> Path:
  """A path that cannot be created: its parent is a regular file (as an unwritable or read-only
  folder would be; tests run as root, which ignores permission bits)."""
  (tmp_path / "a-file").write_text("x")
  return tmp_path / "a-file" / "out"


# ---- configs ----

@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_refuses_an_unknown_variant(name, capsys, tmp_path):
  arg = "8,smok" if name == "scifact_ff" else "smok"
  rc = main(["train", "--config", f"{REPO}/configs/{name}.py:{arg}", "--workdir",
             str(tmp_path / "run")])
  assert rc == 2
  _one_line_error(capsys, f"configs/{name}.py: unknown variant ['smok']")
  assert not (tmp_path / "run").exists()


def test_a_finished_run_refuses_a_changed_config_unless_forked(tiny_beir, tmp_path, capsys):
  from tests.test_train import smoke_config
  from embed_jax import train as T
  workdir = tmp_path / "run"
  T.train(smoke_config(tiny_beir), workdir)
  before = _tree(workdir)
  with pytest.raises(ValueError, match=r"holds a run of another config \(optim.lr: 5e-05 -> "
                                       r"0.01\): use a new --workdir, or --fork"):
    T.train(smoke_config(tiny_beir, **{"optim.lr": 1e-2}), workdir)
  assert _tree(workdir) == before  # config.json, checkpoints and export untouched
  # The same through the CLI: one line, exit code 2.
  capsys.readouterr()
  rc = main(["train", "--config", f"{REPO}/configs/scifact_mnrl.py:smoke", "--workdir",
             str(workdir), f"--config.data.dataset={tiny_beir}", "--config.optim.lr=0.01"])
  assert rc == 2
  _one_line_error(capsys, "optim.lr: 5e-05 -> 0.01", "--fork")
  # Keys that do not change what is trained may differ (a finished run: nothing to do).
  again = T.train(smoke_config(tiny_beir, **{"evals.test.at_start": True}), workdir)
  assert again["steps_run"] == 0
  # Forking keeps the old config beside the new one and goes on with the new one.
  old = json.loads((workdir / "config.json").read_text())
  T.train(smoke_config(tiny_beir, **{"optim.lr": 1e-2}), workdir, fork=True)
  assert json.loads((workdir / "config.fork-0.json").read_text()) == old
  assert json.loads((workdir / "config.json").read_text())["optim"]["lr"] == 1e-2


def test_a_resumed_run_refuses_a_changed_config(tiny_beir, tmp_path):
  from tests.test_train import smoke_config
  from embed_jax import train as T
  T.train(smoke_config(tiny_beir), tmp_path / "run", stop_after=2)
  with pytest.raises(ValueError, match=r"max_steps: 4 -> 8"):
    T.train(smoke_config(tiny_beir, **{"max_steps": 8}), tmp_path / "run")
  assert T.train(smoke_config(tiny_beir), tmp_path / "run")["steps"] == 4  # resumes as it was


def test_a_run_made_before_an_option_existed_goes_on_while_the_option_is_off(tiny_beir, tmp_path):
  """A key the saved config.json lacks (added to the configs since) is no difference while the
  new config leaves it off; set on, it is one."""
  from tests.test_train import smoke_config
  from embed_jax import train as T
  T.train(smoke_config(tiny_beir), tmp_path / "run", stop_after=2)
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  del saved["lora"]["merge_in_step"], saved["lora"]["rslora"]
  (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match=r"lora.merge_in_step: '\(none\)' -> 'ffn'"):
    T.train(smoke_config(tiny_beir, **{"lora.merge_in_step": "ffn"}), tmp_path / "run")
  assert T.train(smoke_config(tiny_beir), tmp_path / "run")["steps"] == 4


# ---- outputs that cannot be written: refused before compute, one line naming the path ----

def test_encode_and_eval_refuse_an_unwritable_output_before_loading_anything(
    tiny_model_dir, tiny_beir, tmp_path, capsys, monkeypatch):
  import embed_jax
  monkeypatch.setattr(embed_jax, "load", lambda *a, **k: pytest.fail("loaded a model"))
  texts = tmp_path / "texts.txt"
  texts.write_text("a text\nanother\n")
  blocked = _blocked(tmp_path)
  assert main(["encode", "--model", str(tiny_model_dir), "--input", str(texts),
               "--output", str(blocked / "emb.npy")]) == 2
  _one_line_error(capsys, str(blocked))
  assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(tiny_beir),
               "--output", str(blocked / "r.json")]) == 2
  _one_line_error(capsys, str(blocked))
  assert main(["sts", "--model", str(tiny_model_dir), "--output", str(blocked / "s.json")]) == 2
  _one_line_error(capsys, str(blocked))


def test_train_refuses_an_unwritable_workdir_in_one_line(tiny_beir, tmp_path, capsys):
  blocked = _blocked(tmp_path)
  rc = main(["train", "--config", f"{REPO}/configs/scifact_mnrl.py:smoke", "--workdir",
             str(blocked), f"--config.data.dataset={tiny_beir}"])
  assert rc == 2
  _one_line_error(capsys, str(blocked))


def test_save_into_an_unwritable_folder_or_over_a_mount_point_loses_nothing(
    tiny_model_dir, tmp_path, monkeypatch):
  import embed_jax
  model = embed_jax.load(tiny_model_dir)
  with pytest.raises(OSError):
    model.save(_blocked(tmp_path))
  out = model.save(tmp_path / "exports" / "m")
  before = _tree(out)
  # A mount point cannot be renamed: replacing the export there fails (EBUSY).
  real_rename = os.rename

  def rename(src, dst):
    if Path(src) == out:
      raise OSError(errno.EBUSY, "Device or resource busy", str(src))
    return real_rename(src, dst)

  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(OSError, match=r"cannot replace .*/exports/m \(Device or resource busy\); "
                                    r"export into a new folder"):
    model.save(out)
  assert _tree(out) == before
  assert sorted(p.name for p in out.parent.iterdir()) == ["m"]  # no .m.old-* or .m.tmp-* left


def test_exported_files_are_readable_by_others(tiny_model_dir, tiny_beir, tmp_path):
  import embed_jax
  from tests.test_train import smoke_config
  from embed_jax import train as T
  old = os.umask(0o022)
  try:
    out = embed_jax.load(tiny_model_dir).save(tmp_path / "export")
    T.train(smoke_config(tiny_beir, **{"evals.test.at_start": True}), tmp_path / "run")
  finally:
    os.umask(old)
  files = [p for p in out.rglob("*") if p.is_file()] + [
      tmp_path / "run" / n for n in ("results.json", "results_before.json", "config.json")]
  files += [p for p in (tmp_path / "run" / "export").rglob("*") if p.is_file()]
  modes = {str(p): oct(p.stat().st_mode & 0o777) for p in files}
  assert set(modes.values()) == {"0o644"}, modes
  assert oct(out.stat().st_mode & 0o777) == "0o755"


# ---- data refused before the workdir (or the model) exists ----

@pytest.mark.parametrize("change, message", [
    ({"data.train_split": "nosuch"}, r"data.train_split='nosuch': tiny has no such qrels split; "
                                     r"it has train, test"),
    ({"evals.test.split": "validation"}, r"evals.test.split='validation'"),
])
def test_data_that_lacks_what_the_config_reads_is_refused_before_the_workdir(
    change, message, tiny_beir, tmp_path):
  from tests.test_train import smoke_config
  from embed_jax import train as T
  with pytest.raises(ValueError, match=message):
    T.train(smoke_config(tiny_beir, **change), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_dataset_without_qrels_is_refused_by_train_and_eval(tmp_path, capsys, monkeypatch,
                                                              tiny_model_dir):
  from tests.test_beir_data import write_beir
  from tests.test_train import smoke_config
  from embed_jax import train as T
  monkeypatch.setenv("EMBED_JAX_CACHE", str(tmp_path / "cache"))
  folder = write_beir(tmp_path / "noqrels", qrels={})
  with pytest.raises(ValueError, match=r"it has none \(no qrels/\*\.tsv\)"):
    T.train(smoke_config(folder), tmp_path / "run")
  assert not (tmp_path / "run").exists()
  capsys.readouterr()
  assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(folder)]) == 2
  _one_line_error(capsys, "it has no qrels split (qrels/<split>.tsv)")


def test_a_smoke_export_names_no_hub_model(tiny_beir, tmp_path):
  from tests.test_train import smoke_config
  from embed_jax import train as T
  out = T.train(smoke_config(tiny_beir), tmp_path / "run")
  card = (Path(out["export"]) / "README.md").read_text()
  assert "all-MiniLM" not in card and "base_model:" not in card
  assert "tiny-random-bert" in card


# ---- the command line ----

def test_the_cli_loads_no_jax_for_help_or_version():
  """`embed-jax --help` stays fast: the parser (with every command's help) imports neither JAX,
  Flax nor TFDS."""
  code = ("import sys, contextlib, io\n"
          "from embed_jax.cli import build_parser\n"
          "p = build_parser()\n"
          "for argv in (['--help'], ['train', '--help'], ['--version']):\n"
          "  with contextlib.redirect_stdout(io.StringIO()) as out:\n"
          "    try: p.parse_args(argv)\n"
          "    except SystemExit: pass\n"
          "  assert out.getvalue(), argv\n"
          "heavy = [m for m in ('jax', 'flax', 'tensorflow_datasets', 'transformers') if m in sys.modules]\n"
          "assert not heavy, heavy\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_train_help_lists_the_configs_and_their_variants(capsys):
  with pytest.raises(SystemExit):
    main(["train", "--help"])
  out = capsys.readouterr().out
  assert "configs/scifact_mrl.py  [:nopca,sd,smoke]" in out
  assert ":smoke runs any config on a tiny random" in " ".join(out.split())
