"""The public surface a user's code depends on: changing it must be a deliberate edit of this file."""

import subprocess
import sys

import nti_lightning
import nti_lightning.p2p

API = {"Inversion", "InversionConfig", "NTIModel", "RunConfig", "__version__", "edit", "invert", "load_config",
       "load_inversion", "load_model", "open_run", "reconstruct", "save_inversion"}  # fmt: skip
P2P = {"AlignmentError", "AttentionControl", "AttentionControlEdit", "AttentionRefine", "AttentionReplace",
       "AttentionReweight", "AttentionStore", "EditResult", "EditSpec", "EmptyControl", "LocalBlend",
       "P2PAttnProcessor", "WordNotInPromptError", "attention_control", "edit", "edit_batch",
       "register_attention_control"}  # fmt: skip


def test_all_is_pinned_and_every_name_resolves():
    assert set(nti_lightning.__all__) == API and set(nti_lightning.p2p.__all__) == P2P
    for mod in (nti_lightning, nti_lightning.p2p):
        for name in mod.__all__:
            assert getattr(mod, name) is not None, name


def _help(*argv) -> str:
    res = subprocess.run([sys.executable, "-m", "nti_lightning.cli", *argv, "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_cli_help_is_pinned():
    assert "{invert,status,edit,eval}" in _help()
    inv = _help("invert")
    for flag in ("--images", "--captions", "--output", "--config", "--overwrite", "--retry-failed", "--quiet"):
        assert flag in inv, flag
    assert "output" in _help("status")
    for flag in ("--target", "--edits", "--mode", "--blend", "--cross-replace", "--self-replace", "--output"):
        assert flag in _help("edit"), flag
    for flag in ("--out", "--methods", "--model", "--steps", "--limit", "--lpips", "--dino", "--clip", "--num-shards"):
        assert flag in _help("eval"), flag
