"""Which images of a shards-layout worker get PNGs: the first N, and the outliers — a reconstruction PSNR not
finite, or far below the worker's recent median — up to a cap; every outlier is flagged."""

from __future__ import annotations

from nti_lightning.jobs.invert_outputs import PngPolicy


def test_the_first_images_and_the_outliers_get_pngs():
    policy = PngPolicy(first=3, drop_db=6.0, max_flagged=2)
    judged = [policy.judge(30.0 + 0.1 * (k % 5)) for k in range(40)]  # a run of typical images
    assert [kind for kind, _ in judged[:3]] == ["first"] * 3 and {kind for kind, _ in judged[3:]} == {None}
    assert all(why is None for _, why in judged)
    kind, why = policy.judge(20.0)  # 10 dB below the median of ~30.2 dB
    assert kind == "flagged" and why.startswith("reconstruction PSNR 20.00 dB vs the VAE round trip, 10.2 dB under")
    assert policy.judge(25.0) == (None, None)  # 5.2 dB below: within the drop
    assert policy.judge(None)[0] == "flagged"  # not finite (strict JSON writes NaN as null)
    kind, why = policy.judge(float("nan"))
    assert kind is None and "not finite" in why  # over the cap: flagged in the record, no PNG
    assert policy.judge(float("inf")) == (None, None)  # identical images: perfect, not an outlier


def test_too_few_images_to_judge_and_off():
    early = PngPolicy(first=0, drop_db=6.0, max_flagged=10)
    assert [early.judge(v)[1] for v in (30.0, 5.0, 30.0)] == [None, None, None]  # under MIN_SEEN values seen
    off = PngPolicy(first=0, drop_db=0.0, max_flagged=10)
    for _ in range(40):
        off.judge(30.0)
    assert off.judge(1.0) == (None, None) and off.judge(float("nan")) == (None, None)
