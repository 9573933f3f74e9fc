"""Typed settings of Prompt-to-Prompt editing (Hertz et al. 2022): the one home of ``nti edit``'s defaults.

``EditConfig`` is a dataclass without imports (``nti --help`` reads its defaults through ``edit_args``); it is the
``edit`` section of ``nti edit``'s structured config (``jobs.edit_config.EditRunConfig``, loaded by
``config.load_config``), so its step windows are typed ``Any`` there (OmegaConf cannot type their unions) and
normalised here: a window arrives as a fraction or a ``[start, end]`` list; ``parse_*`` read the values the
command line and an edits file give. Its defaults are the authors' (``prompt-to-prompt`` notebook,
``null_text_w_ptp.ipynb``). ``nti edit`` saves each edit's resolved ``EditConfig`` as JSON beside the edit's
pictures (``p2p.outputs``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

EDIT_MODES = ("replace", "refine", "reweight")
"""P2P §3.2: word swap, adding a phrase, attention re-weighting."""

StepWindow = float | tuple[float, float]
"""A fraction f of the steps (the first ⌊f·T⌋ steps) or a (start, end) pair of fractions."""

CrossReplace = StepWindow | dict[str, StepWindow]
"""A window for every token, or ``{"default_": window, word: window, …}``: words of the target prompt with their
own window ("default_": the other tokens; the whole run where absent, as the authors)."""


def window_fractions(window: StepWindow) -> tuple[float, float]:
    """A step window as (start, end) fractions with 0 ≤ start ≤ end ≤ 1 (P2P's τ as a fraction of T)."""
    if isinstance(window, bool):
        raise ValueError(f"step window {window!r} must be a fraction in [0, 1] or a pair 0 ≤ start ≤ end ≤ 1")
    if isinstance(window, (int, float)):
        start, end = 0.0, float(window)
    elif isinstance(window, (list, tuple)) and len(window) == 2:
        start, end = float(window[0]), float(window[1])
    else:
        raise ValueError(f"step window {window!r} must be a fraction in [0, 1] or a pair 0 ≤ start ≤ end ≤ 1")
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"step window {window!r} must be a fraction in [0, 1] or a pair 0 ≤ start ≤ end ≤ 1")
    return start, end


def normal_window(window: Any) -> Any:
    """A window as ``StepWindow``: a number as a float, a [start, end] list or tuple as a tuple (else as given,
    for ``window_fractions`` to refuse)."""
    if isinstance(window, (int, float)) and not isinstance(window, bool):
        return float(window)
    if isinstance(window, (list, tuple)) and len(window) == 2:
        return tuple(float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in window)
    return window


def normal_cross_replace(value: Any) -> Any:
    """``cross_replace`` as ``CrossReplace``: a window, or ``{"default_": window, word: window}`` ("default" and
    "default_" both name the other tokens' window)."""
    if isinstance(value, dict):
        return {("default_" if k in ("default", "default_") else str(k)): normal_window(v) for k, v in value.items()}
    return normal_window(value)


@dataclass
class EditConfig:
    """How ``nti edit`` edits (every field but ``batch_size``, ``attention`` and ``overwrite`` may be set per
    line of an edits JSONL; the command line sets the defaults of all lines)."""

    mode: str | None = None
    """"replace" (word swap: same number of words), "refine" (adding words), "reweight" (target = source);
    None: inferred per edit — same words → "reweight" if it re-weights (else nothing to edit), the same number
    of words → "replace", otherwise "refine"."""
    cross_replace: Any = 0.8
    """τ_c of P2P Algorithm 1 (a ``CrossReplace``): the steps in which the source's cross-attention maps replace
    the target's (authors: 0.8); ``{"default": 0.8, "dog": 0.3}`` gives words of the target their own window."""
    self_replace: Any = 0.4
    """The steps (a ``StepWindow``) in which the source's self-attention maps are injected, in layers with at most
    ¼ of the latent's positions (authors: 0.4–0.6 per example)."""
    guidance_scale: float | None = None
    """w of classifier-free guidance; None: the one the inversion was optimised for (recorded in it), since
    the null embeddings ∅_t are only right for that w (Mokady et al. 2023 §3.2)."""
    local_blend_start: float = 0.2
    """Fraction of the steps before the local blend starts (authors: ``start_blend=0.2``)."""
    local_blend_threshold: float = 0.3
    """A latent position is inside the blend mask where the words' max-normalised attention exceeds this
    (authors: ``th=(.3, .3)``)."""
    batch_size: int = 4
    """Edits of one image sampled in one pass (the UNet batch is 2·(1 + edits))."""
    attention: bool = False
    """Also save each token's cross-attention map averaged over the steps (P2P Figure 4)."""
    overwrite: bool = False
    """Single form: an edit whose file name is taken replaces the earlier edit's files (all of them); without it
    the new edit gets the next free numbered name (``<stem>-2``, ``<stem>-3``, …) and nothing is overwritten.
    Batch form (``--edits``): the job's records start over, so every line is redone (its files rewritten)."""

    def __post_init__(self) -> None:
        self.cross_replace = normal_cross_replace(self.cross_replace)
        self.self_replace = normal_window(self.self_replace)
        if self.mode is not None and self.mode not in EDIT_MODES:
            raise ValueError(f"unknown edit mode {self.mode!r}; choose one of {', '.join(EDIT_MODES)}")
        windows = self.cross_replace.values() if isinstance(self.cross_replace, dict) else [self.cross_replace]
        for window in [*windows, self.self_replace]:
            window_fractions(window)
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        for name in ("local_blend_start", "local_blend_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (windows as lists)."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Values as the command line and an edits file give them
# ---------------------------------------------------------------------------------------------------------


def parse_assignments(items: list[str] | None, what: str) -> dict[str, float]:
    """["cat=2", "red car=0.5"] → {"cat": 2.0, "red car": 0.5}."""
    out: dict[str, float] = {}
    for item in items or []:
        word, sep, value = item.rpartition("=")
        try:
            if not sep or not word.strip():
                raise ValueError
            out[word.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{what}: {item!r} is not WORD=NUMBER") from None
    return out


def parse_cross_replace(value, default: CrossReplace) -> CrossReplace:
    """A CLI list or a JSON value → a fraction, a (start, end) pair or {"default_": …, word: …}.

    ``default`` is the window of the tokens the value does not name (a list without a plain fraction).
    """
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        return {("default_" if k in ("default", "default_") else k): parse_window(v) for k, v in value.items()}
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return (float(value[0]), float(value[1]))
    if not isinstance(value, list):
        raise ValueError(f"cross_replace: {value!r} is not a fraction, a [start, end] pair or {{word: fraction}}")
    plain = [i for i in value if "=" not in str(i)]
    if len(plain) > 1:
        raise ValueError(f"--cross-replace: give one default fraction, got {plain}")
    words = parse_assignments([str(i) for i in value if "=" in str(i)], "--cross-replace")
    try:
        fraction = float(plain[0]) if plain else default
    except ValueError:
        raise ValueError(f"--cross-replace: {plain[0]!r} is not a fraction") from None
    return {"default_": fraction, **words} if words else fraction


def parse_window(value):
    """A JSON step window: a fraction or a [start, end] pair."""
    return tuple(float(x) for x in value) if isinstance(value, (list, tuple)) else float(value)


EDIT_DEFAULTS = EditConfig()
"""The defaults, for signatures and the argument parser."""
