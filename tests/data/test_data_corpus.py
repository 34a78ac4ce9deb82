"""The corpus script: offline detection that never hangs, the fallback corpus, and its text cleaning."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src" / "ch6"))
import megatron_datasets  # noqa: E402


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_variables_skip_the_hub(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    assert megatron_datasets.hub_reachable() == (False, f"{variable} is set")


def test_unreachable_endpoint_is_detected_without_waiting(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    reachable, reason = megatron_datasets.hub_reachable(timeout=3.0)
    assert not reachable and "127.0.0.1:9 unreachable" in reason


def test_paragraph_cleaning_keeps_prose_and_drops_code():
    docstring = (
        "Return the number of items.\nIt counts them one by one.\n\n"
        "    def indented(code):\n        pass\n\n"
        ">>> len([1, 2])\n2\n\n"
        "A second paragraph of words."
    )
    assert list(megatron_datasets._paragraphs(docstring)) == [
        "Return the number of items. It counts them one by one.", "A second paragraph of words."]
    documents = list(megatron_datasets._documents(docstring, min_length=60))
    assert documents == ["Return the number of items. It counts them one by one.\nA second paragraph of words."]


@pytest.mark.parametrize("source", ["wikitext", "auto"])
def test_only_auto_falls_back_to_offline_text_and_says_so(tmp_path, source):
    # datasets reads HF_DATASETS_OFFLINE when imported, so this runs in a fresh process.
    output = tmp_path / "c.jsonl"
    result = subprocess.run(
        [sys.executable, "src/ch6/megatron_datasets.py", "--source", source, "--output", str(output),
         "--num-samples", "5", "--show", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    if source == "wikitext":  # asked for by name: no silent substitute
        assert result.returncode != 0 and not output.exists()
        assert "error: --source wikitext: the Hugging Face hub is not reachable (HF_HUB_OFFLINE is set)" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert "Hugging Face hub not used: HF_HUB_OFFLINE is set; using the documentation" in result.stdout
        assert "wrote 5 documents" in result.stdout


def test_the_lessons_two_commands_meet_in_the_current_folder(tmp_path):
    """The lesson runs ``python ../megatron_datasets.py`` and then ``preprocess_data.py --input
    megatron_datasets.jsonl`` in one folder: by default the corpus is written there, and train_tokenizer.py
    reads it from there."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "src/ch6/megatron_datasets.py"), "--num-samples", "40",
                             "--min-length", "200", "--show", "0"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "megatron_datasets.jsonl").is_file()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "src/ch6/train_tokenizer.py"),
                             "--tokenizer", "train", "--vocab-size", "300"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
