"""Every bad input and environment fault ends in one line that says what to do (issue #17).

One case a row: what makes the bad input, the command line, the expected exit code and a phrase of
the expected message. No case may exit 0 or print a traceback, and no ``run`` case may open an
MLflow run (its store file is never created) or leave a ``.lock``/``.partial`` stage folder behind.
Permission faults are simulated by denying ``os.access`` on one path (tests run as root, and root
ignores file permissions); one subprocess repeats them for real as the unprivileged ``nobody``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import numpy as np
import pytest
from PIL import Image

from fakes import _save, free_port, make_cvc, make_folder, make_kvasir, make_refuge
from sweeps.cli import main

REPO = Path(__file__).resolve().parent.parent
BASE = str(REPO / "experiments/configs/procedural_polyp_baseline.yaml")
DIFF = str(REPO / "experiments/configs/procedural_polyp_diffaug.yaml")
TINY_BASE = REPO / "lightning_modules/bases/tiny"


# ------------------------------------------------------------------------------ input makers
def _isolated(tmp: Path) -> List[str]:
    return [f"artifacts_dir={tmp}/artifacts", f"output_dir={tmp}/outputs", f"data.cache_dir={tmp}/cache",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_root={tmp}/mlruns"]


def run(tmp: Path, *overrides: str, config: str = BASE) -> List[str]:
    return ["run", config, *_isolated(tmp), *overrides]


def run_data(tmp: Path, name: str, root: Path, *overrides: str) -> List[str]:
    return run(tmp, f"data.name={name}", f"data.root={root}", "data.n_real=null", "data.image_size=16",
               *overrides)


def inspect(name: str, root: Path, *extra: str) -> List[str]:
    return ["data", "inspect", "--dataset", name, "--root", str(root), *extra]


def study_file(tmp: Path, *overrides: str) -> Path:
    """A one-trial study on the diffusion config whose trials write under ``tmp``."""
    path = tmp / "study.yaml"
    path.write_text(json.dumps({"study_name": "s", "base_config": DIFF, "overrides": _isolated(tmp) + list(overrides),
                                "storage": f"sqlite:///{tmp}/optuna.db", "n_trials": 1,
                                "search_space": {"augment.ratio": {"type": "float", "low": 0.5, "high": 3.0}}}))
    return path


def cvc_one_sequence(tmp: Path) -> Path:
    return make_cvc(tmp / "cvc", frames=range(1, 13))  # frames 1..12: all in video sequence 1


def folder_empty_masks(tmp: Path) -> Path:
    root = make_folder(tmp / "folder")
    for p in (root / "masks").iterdir():
        _save(np.zeros((24, 20), np.uint8), p)
    return root


def folder_with_split(tmp: Path, **split) -> tuple:
    """Folder data whose case6/case7 masks are empty, and a split file (``split`` overrides)."""
    root = make_folder(tmp / "folder")
    for k in (6, 7):
        _save(np.zeros((24, 20), np.uint8), root / "masks" / f"case{k}.png")
    names = {"train": ["case0", "case1", "case2", "case7"], "train_few": ["case0", "case1"],
             "val": ["case3", "case4"], "test": ["case5", "case6"], **split}
    (tmp / "split.json").write_text(json.dumps(names))
    return root, tmp / "split.json"


def refuge_without_cup(tmp: Path) -> Path:
    root = make_refuge(tmp / "refuge", n=2)
    for p in root.rglob("*.bmp"):
        m = np.asarray(Image.open(p)).copy()
        m[m == 0] = 128  # the cup becomes disc rim: class optic_cup appears nowhere
        _save(m, p)
    return root


def kvasir_empty_official_test(tmp: Path) -> Path:
    root = make_kvasir(tmp / "kvasir", official=True)
    (root / "val.txt").write_text("")
    return root


def cvc_damaged(tmp: Path, how: str) -> Path:
    root = make_cvc(tmp / "cvc")
    if how == "labels":
        m = np.zeros((24, 20), np.uint8)
        m[2:8, 2:8], m[10:12, 10:12] = 255, 7
        _save(m, root / "Ground Truth" / "1.tif")
    elif how == "16bit":
        _save(Image.fromarray(np.full((24, 20), 1000, np.uint16)), root / "Ground Truth" / "2.tif")
    elif how == "size":
        _save(np.zeros((5, 5), np.uint8), root / "Ground Truth" / "3.tif")
    elif how == "zero_byte":
        (root / "Original" / "26.tif").write_bytes(b"")
    elif how == "not_image":
        (root / "Original" / "27.tif").write_text("<html>404 Not Found</html>")
    return root


def broken_base(tmp: Path, how: str) -> Path:
    base = tmp / "base"
    shutil.copytree(TINY_BASE, base)
    if how == "missing":
        shutil.rmtree(base / "vae")
    elif how == "truncated":
        w = base / "unet" / "diffusion_pytorch_model.safetensors"
        w.write_bytes(w.read_bytes()[:4096])
    elif how == "json":
        (base / "vae" / "config.json").write_text('{"block_out_channels": [32, 64,\n')
    else:
        raise ValueError(f"unknown damage {how!r}")
    return base


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(text))
    return path


def grid(tmp: Path, overrides: List[str], config: str = BASE) -> Path:
    return write(tmp, "grid.yaml", f"""\
        name: t_bad
        base_config: {config}
        overrides: {json.dumps(_isolated(tmp) + overrides)}
        variants: {{a: [], b: ["augment.method=none"]}}
        """)


def study(tmp: Path, overrides: List[str]) -> Path:
    return write(tmp, "study.yaml", f"""\
        study_name: t_bad
        base_config: {BASE}
        overrides: {json.dumps(_isolated(tmp) + overrides)}
        storage: sqlite:///{tmp}/optuna.db
        direction: maximize
        metric: val/dice
        n_trials: 1
        search_space:
          augment.ratio: {{type: float, low: 0.5, high: 3.0}}
        """)


def deny(monkeypatch, path: Path) -> None:
    """Make ``os.access`` report ``path`` as neither readable nor writable (as for a non-owner)."""
    real, target = os.access, os.path.realpath(path)
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k:
                        False if os.path.realpath(p) == target else real(p, mode, *a, **k))


def unreadable_config(tmp: Path, monkeypatch) -> List[str]:
    from omegaconf import OmegaConf

    path = write(tmp, "exp.yaml", "data: {n_real: 4}\n")

    def load(p, *a, **k):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(OmegaConf, "load", load)
    return ["run", str(path)]


def made(tmp: Path, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------ the table
@dataclass
class Case:
    id: str
    argv: Callable  # (tmp_path, monkeypatch) -> argv
    code: int
    phrase: str


SEQ = "all 12 frames are in video sequence seq01"
NO_LESION = "holds a lesion (all 8 masks are empty)"
CASES = [
    # -- data that makes a run meaningless: inspect lists it (exit 1), run refuses it (exit 2)
    Case("empty-splits-one-sequence/inspect", lambda t, m: inspect("cvc_clinicdb", cvc_one_sequence(t)), 1, SEQ),
    Case("empty-splits-one-sequence/run", lambda t, m: run_data(t, "cvc_clinicdb", cvc_one_sequence(t)), 2, SEQ),
    Case("too-few-pairs/inspect", lambda t, m: inspect("folder", make_folder(t / "f", n=2)), 1,
         "at least 3 are needed"),
    Case("empty-official-test/inspect", lambda t, m: inspect("kvasir_seg", kvasir_empty_official_test(t)), 1,
         "the test split is empty: the official split"),
    Case("empty-official-test/run", lambda t, m: run_data(t, "kvasir_seg", kvasir_empty_official_test(t)), 2,
         "the test split is empty: the official split"),
    Case("empty-split-in-split-file/run", lambda t, m: run_data(
        t, "folder", (s := folder_with_split(t, val=[]))[0], f"data.split_file={s[1]}"), 2,
         "the val split is empty in split file"),
    Case("no-lesion-at-all/inspect", lambda t, m: inspect("folder", folder_empty_masks(t)), 1, NO_LESION),
    Case("no-lesion-at-all/run", lambda t, m: run_data(t, "folder", folder_empty_masks(t)), 2, NO_LESION),
    Case("split-without-lesion/inspect", lambda t, m: inspect(
        "folder", (s := folder_with_split(t, val=["case6"], test=["case4", "case5"]))[0], "--split-file",
        str(s[1])), 1,
         "the val split of folder"),
    Case("split-without-lesion/run", lambda t, m: run_data(
        t, "folder", (s := folder_with_split(t, val=["case6"], test=["case4", "case5"]))[0],
        f"data.split_file={s[1]}"), 2, "the val split of folder"),
    Case("few-shot-without-lesion/inspect", lambda t, m: inspect(
        "folder", (s := folder_with_split(t, train_few=["case7"]))[0], "--split-file", str(s[1]),
        "--n-real", "1"), 1, "the few-shot subset of folder"),
    Case("few-shot-without-lesion/run", lambda t, m: run_data(
        t, "folder", (s := folder_with_split(t, train_few=["case7"]))[0], f"data.split_file={s[1]}",
        "data.n_real=1"), 2, "holds no lesion: nothing to learn from"),
    Case("class-in-no-mask/inspect", lambda t, m: inspect("refuge2", refuge_without_cup(t)), 1,
         "holds class 'optic_cup' (index 2)"),
    Case("class-in-no-mask/run", lambda t, m: run_data(t, "refuge2", refuge_without_cup(t)), 2,
         "holds class 'optic_cup' (index 2)"),
    Case("n-real-too-large/run", lambda t, m: run_data(t, "cvc_clinicdb", make_cvc(t / "c"), "data.n_real=100000"),
         2, "exceeds the"),
    # -- broken files (already reported before issue #17)
    Case("wrong-label-values", lambda t, m: inspect("cvc_clinicdb", cvc_damaged(t, "labels")), 1, "should be binary"),
    Case("16-bit-mask", lambda t, m: inspect("cvc_clinicdb", cvc_damaged(t, "16bit")), 1, "expected 8-bit labels"),
    Case("size-mismatch", lambda t, m: inspect("cvc_clinicdb", cvc_damaged(t, "size")), 1, "must match its image"),
    Case("zero-byte-file", lambda t, m: inspect("cvc_clinicdb", cvc_damaged(t, "zero_byte")), 1, "26.tif"),
    Case("non-image-file", lambda t, m: inspect("cvc_clinicdb", cvc_damaged(t, "not_image")), 1, "not an image"),
    Case("size-mismatch/run", lambda t, m: run_data(t, "cvc_clinicdb", cvc_damaged(t, "size")), 2,
         "must match its image"),
    Case("wrong-layout", lambda t, m: inspect("cvc_clinicdb", make_kvasir(t / "k")), 1,
         "is not in the cvc_clinicdb layout"),
    Case("missing-root", lambda t, m: inspect("kvasir_seg", t / "nowhere"), 1, "does not exist or is not a folder"),
    Case("missing-root/run", lambda t, m: run_data(t, "kvasir_seg", t / "nowhere"), 2,
         "does not exist or is not a folder"),
    Case("unknown-dataset", lambda t, m: inspect("kvasir", t), 1, "Did you mean 'kvasir_seg'"),
    # -- config values: every count and size has a range
    Case("n-real-zero", lambda t, m: run(t, "data.n_real=0"), 2, "'data.n_real' is 0"),
    Case("n-samples-zero", lambda t, m: run(t, "generation.n_samples=0"), 2, "'generation.n_samples' is 0"),
    Case("finetune-steps-zero", lambda t, m: run(t, "diffusion.steps=0"), 2, "'diffusion.steps' is 0"),
    Case("generation-steps-zero", lambda t, m: run(t, "generation.steps=0"), 2, "'generation.steps' is 0"),
    Case("batch-size-zero", lambda t, m: run(t, "data.batch_size=0"), 2, "'data.batch_size' is 0"),
    Case("generation-batch-zero", lambda t, m: run(t, "generation.batch_size=0"), 2, "'generation.batch_size'"),
    Case("image-size-tiny", lambda t, m: run(t, "data.image_size=8"), 2, "in [16, 4096]"),
    Case("ratio-negative", lambda t, m: run(t, "augment.ratio=-1"), 2, "'augment.ratio' must be >= 0"),
    Case("val-fraction-zero", lambda t, m: run(t, "data.val_fraction=0"), 2, "'data.val_fraction' is 0"),
    Case("fractions-leave-no-train", lambda t, m: run(t, "data.val_fraction=0.5", "data.test_fraction=0.5"), 2,
         "so that the train split keeps pairs"),
    Case("max-steps-zero", lambda t, m: run(t, "trainer.max_steps=0"), 2, "'trainer.max_steps' is 0"),
    Case("training-never-ends", lambda t, m: run(t, "trainer.max_epochs=-1", "trainer.max_steps=-1"), 2,
         "training never ends"),
    Case("timestep-out-of-range", lambda t, m: run(t, "validator.t_eval=1000"), 2, "in [1, 999]"),
    Case("negative-seed", lambda t, m: run(t, "data.split_seed=-1"), 2, "'data.split_seed' is -1"),
    Case("scale-range-reversed", lambda t, m: run(t, "generation.scale_range=[2,1]"), 2, "0 < low <= high"),
    Case("decoder-channels-vs-depth", lambda t, m: run(t, "segmenter.decoder_channels=[16,8]"), 2,
         "one per encoder stage"),
    Case("quantile-zero", lambda t, m: run(t, "validator.quality_quantile=0"), 2, "in (0.0, 1.0]"),
    Case("lora-rank-zero", lambda t, m: run(t, "diffusion.lora_rank=0"), 2, "'diffusion.lora_rank' is 0"),
    # -- config errors that already worked
    Case("unknown-key", lambda t, m: run(t, "data.n_reel=4"), 2, "Did you mean 'data.n_real'"),
    Case("bad-type", lambda t, m: run(t, "data.image_size=big"), 2, "Invalid value for 'data.image_size'"),
    Case("out-of-range", lambda t, m: run(t, "validator.iou_threshold=1.5"), 2, "must lie in [0, 1]"),
    Case("bad-choice", lambda t, m: run(t, "augment.method=gan"), 2, "choose one of"),
    Case("unknown-stage", lambda t, m: run(t, "--stages", "segment,train"), 2, "Unknown stage(s) ['train']"),
    Case("malformed-override", lambda t, m: run(t, "trainer.max_epochs"), 2, "not of the form key=value"),
    Case("unparsable-override", lambda t, m: run(t, "generation.scale_range=[1,"), 2, "cannot be parsed"),
    Case("missing-config", lambda t, m: ["run", str(t / "nope.yaml")], 2, "does not exist"),
    # -- YAML files
    Case("yaml-syntax-error", lambda t, m: ["run", str(write(t, "exp.yaml", "data:\n  name: [polyp\n"))], 2,
         "line 3, column 1: YAML syntax error"),
    Case("yaml-not-a-mapping", lambda t, m: ["run", str(write(t, "exp.yaml", "- data\n- trainer\n"))], 2,
         "must hold a mapping"),
    Case("config-unreadable", unreadable_config, 2, "cannot read config file"),
    Case("grid-typo", lambda t, m: ["grid", str(grid(t, ["data.n_reel=4"])), "--dry-run"], 2,
         "in grid file '"),
    Case("grid-yaml-syntax", lambda t, m: ["grid", str(write(t, "g.yaml", "name: x\naxes: {a: [1, 2\n")), "--dry-run"],
         2, "Grid file"),
    Case("study-typo", lambda t, m: ["sweep", str(study(t, ["segmenter.lrr=1"]))], 2, "in study file '"),
    # -- the diffusion base
    Case("base-missing-part", lambda t, m: run(t, f"diffusion.base_model={broken_base(t, 'missing')}", config=DIFF),
         2, "lacks subfolder(s) vae"),
    Case("base-truncated-weights", lambda t, m: run(t, f"diffusion.base_model={broken_base(t, 'truncated')}",
                                                    config=DIFF), 2, "it is truncated or not a safetensors file"),
    Case("base-broken-json", lambda t, m: run(t, f"diffusion.base_model={broken_base(t, 'json')}", config=DIFF),
         2, "config.json, line 2, column 1: not valid JSON"),
    Case("base-missing", lambda t, m: run(t, f"diffusion.base_model={t}/nothing", config=DIFF), 2, "does not exist"),
    Case("image-size-vs-base", lambda t, m: run(t, "data.image_size=40", config=DIFF), 2, "needs a multiple of 16"),
    # -- permissions and I/O (os.access denied on one path: see ``deny``)
    Case("data-root-unreadable/inspect", lambda t, m: inspect(
        "cvc_clinicdb", (r := make_cvc(t / "c"), deny(m, r))[0]), 1, "permission denied"),
    Case("data-root-unreadable/run", lambda t, m: run_data(
        t, "cvc_clinicdb", (r := make_cvc(t / "c"), deny(m, r))[0]), 2, "permission denied"),
    Case("artifacts-unwritable", lambda t, m: (deny(m, made(t, t / "artifacts")), run(t))[1], 2,
         "(artifacts_dir): permission denied"),
    Case("outputs-unwritable", lambda t, m: (deny(m, made(t, t / "outputs")), run(t))[1], 2,
         "(output_dir): permission denied"),
    Case("cache-unwritable", lambda t, m: (deny(m, made(t, t / "cache")), run(t))[1], 2, "(data.cache_dir)"),
    Case("mlflow-store-unwritable", lambda t, m: (deny(m, made(t, t / "store")),
                                                  run(t, f"tracking.uri=sqlite:///{t}/store/mlflow.db"))[1], 2,
         "(tracking.uri): permission denied"),
    Case("mlflow-server-unreachable", lambda t, m: run(t, f"tracking.uri=http://127.0.0.1:{free_port()}"), 2,
         "(tracking.uri) does not answer"),
    *[Case(f"mlflow-server-unreachable/{argv[0]}", lambda t, m, argv=argv: (m.setenv(
        "MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}"), argv)[1], 2, "(MLFLOW_TRACKING_URI) does not answer")
      for argv in (["grid", str(REPO / "sweeps/grids/demo.yaml"), "--dry-run"],
                   ["sweep", str(REPO / "sweeps/studies/kvasir_seg_tpe.yaml"), "--n-trials", "1"],
                   ["table", str(REPO / "experiments/tables/diffaug_main.yaml")])],
    Case("base-damaged/grid", lambda t, m: ["grid", grid(t, [f"diffusion.base_model={broken_base(t, 'truncated')}"], DIFF)],
         2, "it is truncated or not a safetensors file"),
    Case("artifacts-unwritable/grid", lambda t, m: (deny(m, made(t, t / "artifacts")), ["grid", grid(t, [])])[1], 2,
         "(artifacts_dir): permission denied"),
    Case("base-missing/sweep", lambda t, m: ["sweep", study_file(t, f"diffusion.base_model={t}/nothing")], 2,
         "does not exist"),
    Case("split-file-missing", lambda t, m: run(t, f"data.split_file={t}/none.json"), 2,
         "'data.split_file'"),
    # -- the command line itself
    Case("data-without-subcommand", lambda t, m: ["data"], 2, "subcommands:"),
    Case("data-unknown-subcommand", lambda t, m: ["data", "inspekt"], 2, "unknown subcommand 'inspekt'"),
    Case("unknown-command", lambda t, m: ["frobnicate"], 2, "unknown command 'frobnicate'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_line_that_says_what_to_do(case, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything written to a default location lands in tmp_path
    argv = [str(a) for a in case.argv(tmp_path, monkeypatch)]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == case.code != 0, (out, err)
    assert case.phrase in out + err, (out, err)
    assert "Traceback" not in out + err
    if argv[0] == "run":
        line = [x for x in err.splitlines() if case.phrase in x]
        assert line and line[0].startswith("meddiffaug run: error: "), err
        assert not (tmp_path / "mlflow.db").exists(), "an MLflow run was opened for a bad input"
        left = [p.name for p in (tmp_path / "artifacts").rglob("*") if p.suffix in (".lock", ".partial")]
        assert not left, f"stage files left behind: {left}"


def test_inspect_and_run_refuse_with_the_same_message(tmp_path, capsys):
    root = cvc_one_sequence(tmp_path)
    assert main(inspect("cvc_clinicdb", root)) == 1
    listed = capsys.readouterr().out.split("PROBLEMS (1):\n  - ")[1].strip()
    assert main(run_data(tmp_path, "cvc_clinicdb", root)) == 2
    assert listed in capsys.readouterr().err


def test_file_stems_match_after_unicode_normalisation(tmp_path, capsys):
    root = make_folder(tmp_path / "f")
    nfc = unicodedata.normalize("NFC", "café_1")
    (root / "images" / "case0.png").rename(root / "images" / f"{nfc}.png")
    (root / "masks" / "case0.png").rename(root / "masks" / f"{unicodedata.normalize('NFD', nfc)}.png")
    assert main(inspect("folder", root, "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_pairs"] == 8 and report["problems"] == []


def test_version_and_data_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("meddiffaug ")
    assert main(["data", "--help"]) == 0
    assert "inspect --dataset NAME --root DIR" in capsys.readouterr().out


def test_stage_lock_permission_error_names_artifacts_dir(tmp_path, monkeypatch):
    from experiments.config import ConfigError

    locks = pytest.importorskip("experiments.cache.locks", reason="the stage lock's own module is not there yet")

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "segment"))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ConfigError, match="set artifacts_dir="):
        with locks.stage_lock(tmp_path / "segment" / "abc.lock"):
            pass


def test_yaml_error_reaches_stderr_without_traceback(tmp_path):
    bad = write(tmp_path, "exp.yaml", "trainer:\n  max_epochs: 3\n   precision: 32\n")
    proc = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and f"{bad}', line 3, column" in proc.stderr


DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search", "--"]


def _unprivileged() -> tuple:
    """``(command prefix, "")`` that runs a command under real file permissions, or ``(None, why not)``.

    The user ``nobody`` when it may run this Python; else root without the capabilities that let
    it ignore file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).
    """
    if os.geteuid() != 0:
        return None, "needs root to switch to an unprivileged user"
    tries = [["runuser", "-u", "nobody", "--"], DROP_DAC]
    for prefix in tries:
        if shutil.which(prefix[0]) is None:
            continue
        probe = subprocess.run([*prefix, sys.executable, "-c", "import omegaconf"], capture_output=True,
                               timeout=120)
        if probe.returncode == 0:
            return prefix, ""
    return None, ("neither 'runuser -u nobody' (it may not run this Python) nor 'setpriv' without "
                  "CAP_DAC_OVERRIDE works here")


NOBODY_SCRIPT = """
import contextlib, io, sys
from sweeps.cli import main
for argv in sys.argv[1:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv.split("\\x1f"))
    print(code, err.getvalue().strip().replace("\\n", " | "), flush=True)
"""


@pytest.mark.slow
def test_permission_faults_for_real_without_privileges():
    """Real permissions: an unreadable data root, an unwritable artifacts folder, and a stage folder
    (inside a writable artifacts folder) that the user may not write, as an unprivileged user."""
    prefix, reason = _unprivileged()
    if prefix is None:
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="meddiffaug-nobody-", dir="/tmp"))
    try:
        work.chmod(0o777)
        data = make_cvc(work / "data")
        data.chmod(0o000)  # nobody (nor root without CAP_DAC_*) may list it
        (work / "ro").mkdir(mode=0o555)
        (work / "rw" / "segment").mkdir(parents=True)
        (work / "rw").chmod(0o777)
        (work / "rw" / "segment").chmod(0o555)
        common = [f"output_dir={work}/out", f"data.cache_dir={work}/cache", "tracking.enabled=false",
                  "data.n_procedural=40", "data.image_size=32", "data.n_real=4"]
        calls = [["run", BASE, f"data.name=cvc_clinicdb", f"data.root={data}", f"artifacts_dir={work}/rw", *common],
                 ["run", BASE, f"artifacts_dir={work}/ro/artifacts", *common],
                 ["run", BASE, f"artifacts_dir={work}/rw", *common]]
        proc = subprocess.run([*prefix, sys.executable, "-c", NOBODY_SCRIPT,
                               *["\x1f".join(c) for c in calls]], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "HOME": str(work), "OMP_NUM_THREADS": "1"})
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 3, proc.stdout + proc.stderr[-3000:]
        expected = [f"cannot read {data}: permission denied", f"{work}/ro/artifacts (artifacts_dir): permission",
                    f"cannot write the stage cache {work}/rw/segment"]
        for line, phrase in zip(lines, expected):
            assert line.startswith("2 ") and phrase in line, line
    finally:
        for p in (work / "data", work / "ro", work / "rw" / "segment"):
            if p.exists():
                p.chmod(0o755)
        shutil.rmtree(work, ignore_errors=True)
