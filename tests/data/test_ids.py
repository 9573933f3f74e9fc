"""Image ids are safe by construction: refused when a part is empty, "." or "..", or holds control characters;
stored under one injective path component; shown escaped."""

import pytest

from nti_lightning.data.ids import MAX_COMPONENT_BYTES, UnsafeIdError, check_id, id_component, printable


@pytest.mark.parametrize("bad", ["", ".", "..", "a/../b", "../x", "a//b", "/abs", "x\ny", "x\x1b[31mred", "a\u202eb"])
def test_unsafe_ids_are_refused_naming_the_source(bad):
    with pytest.raises(UnsafeIdError, match="rename the file") as e:
        check_id(bad, source="dir/file.png")
    assert "dir/file.png" in str(e.value) and "\x1b" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("good", ["cat", "shard-000/key_1", "...x", ".hidden", "config.yaml", "a b", "naïve"])
def test_ordinary_ids_pass_unchanged(good):
    assert check_id(good) == good


def test_components_are_one_injective_path_part():
    ids = ["a/b", "a%2Fb", "a__b", "a\\b", "a%b"]
    comps = [id_component(i) for i in ids]
    assert len(set(comps)) == len(ids) and all("/" not in c and "\\" not in c for c in comps)
    assert comps[0] == "a%2Fb" and comps[1] == "a%252Fb"  # "%" is encoded too: no two ids meet
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    ca, cb = id_component(long_a), id_component(long_b)
    assert ca != cb and len(ca.encode()) <= MAX_COMPONENT_BYTES and len(cb.encode()) <= MAX_COMPONENT_BYTES


def test_printable_escapes_what_a_terminal_would_interpret():
    assert printable("ok name") == "ok name"
    shown = printable("evil\x1b[2J\nname\u202e")
    assert "\x1b" not in shown and "\n" not in shown and "\u202e" not in shown
    assert "\\x1b" in shown and "\\n" in shown
