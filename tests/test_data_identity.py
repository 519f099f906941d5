"""Stage signatures know a dataset folder by its content, not by where it is mounted."""
from __future__ import annotations

import shutil

from experiments.cache import data_identity
from experiments.runner import pipeline
from experiments.config import load_config


def _sigs(root, tmp_path):
    data_identity._content_key.cache_clear()
    return pipeline.signatures(load_config(None, ["data.name=kvasir_seg", f"data.root={root}",
                                                  f"data.cache_dir={tmp_path}/cache"]))


def test_same_files_elsewhere_share_signatures_and_an_edit_does_not(tmp_path, make_dataset):
    first = make_dataset("kvasir_seg")
    second = tmp_path / "mounted" / "elsewhere"
    shutil.copytree(first, second, copy_function=shutil.copy2)  # keeps mtimes, like rsync -a or a mount
    assert _sigs(first, tmp_path) == _sigs(second, tmp_path)
    image = next((second / "images").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")
    assert _sigs(first, tmp_path) != _sigs(second, tmp_path)


def test_procedural_data_has_no_root_identity():
    assert data_identity.data_root_identity(load_config(None, [])) is None
