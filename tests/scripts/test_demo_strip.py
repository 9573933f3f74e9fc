"""scripts/make_demo_strip.py end to end on the embedded tiny model (T = 2 to stay short)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from nti_lightning.data.image import prepare_image, tensor_to_image
from nti_lightning.p2p.figures import STRIP_GAP

ROOT = Path(__file__).resolve().parents[2]


def test_demo_strip_has_a_labelled_row_per_sample_and_five_columns(tmp_path):
    out = tmp_path / "strips.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_demo_strip.py"), "--steps", "2", "--threads", "1"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if "NTI vs VAE" in line]
    assert [r.split(":")[0] for r in rows] == ["cat.png", "coffee.png", "astronaut.png"]
    figure = Image.open(out)
    assert figure.width == 5 * 128 + 4 * STRIP_GAP  # source | VAE | no NTI | NTI | P2P edit, 128 px each
    assert figure.height > 3 * 128  # three rows, each under a band of column labels
    # the first tile of the first row is the prepared source image, pixel for pixel, below the label band
    source = tensor_to_image(prepare_image(ROOT / "nti_lightning" / "assets" / "samples" / "cat.png", 128))
    assert any(figure.crop((0, y, 128, y + 128)).tobytes() == source.tobytes() for y in range(figure.height // 3))
