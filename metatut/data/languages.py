r"""Few-shot language identification: "which language is this word from?", on real words of many languages.

The words come from the ``wordfreq`` package (Robyn Speer et al.; code Apache-2.0, word lists CC BY-SA 4.0), whose
wheel ships frequency-ranked word lists of 40+ languages: everything works offline, and the lists are read at run
time, never copied into this repository. Install it with the course extra (``pip install "metatut[course]"``) or
``pip install wordfreq``.

A *class* is a language and an *example* is a word. An N-way K-shot episode draws N languages, relabels them
``0..N-1`` in the order drawn, and takes K support and Q query words of each, all distinct (the conventions of
:func:`metatut.sample_episodes`). Words are given to models as padded index tensors ``[words, length]`` (int64): each
word is decomposed into Unicode NFD (``"ã"`` -> ``"a"`` + a combining tilde), so that the diacritics of a language
never seen in training are mostly made of marks that training languages use; characters outside the
:class:`Alphabet` map to :data:`UNKNOWN`, positions after the end of a word to :data:`PAD`.

Word filter (:func:`language_words`): of the ``top_n`` most frequent entries of each language, keep those made of
letters only (``str.isalpha`` after NFC normalisation) with ``min_length..max_length`` letters; drop every word that
also survives the filter in another of the languages loaded together (``"no"``, ``"hotel"``, ``"barcelona"``: a
word of two languages has no single right answer); keep the ``words_per_language`` most frequent of the rest.

The course's split (:data:`TRAIN_LANGUAGES`, :data:`VALIDATION_LANGUAGES`, :data:`TEST_LANGUAGES`) uses only the
Latin-script languages of wordfreq: across scripts the task is trivial (one Cyrillic letter settles it), within one
script it is not. Each held-out language has a relative among the training languages (Catalan and Portuguese:
Spanish is held out too, but Italian, French and Romanian are in; Danish: Norwegian; Slovak: Czech is held out, but
Polish, Slovene and Serbo-Croatian are in; Latvian: Lithuanian; Malay: Indonesian), and two test languages share a
family (Catalan and Portuguese), so some episodes are hard.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tasks.base import TaskBatch
from ..tasks.episodes import _check_episode as check_episode
from ..tasks.episodes import _check_generator as check_generator_device
from ..tasks.episodes import _gather_episodes as gather_episodes
from ..validate import check_positive_int

__all__ = ["PAD", "UNKNOWN", "LATIN_SCRIPT_LANGUAGES", "TRAIN_LANGUAGES", "VALIDATION_LANGUAGES", "TEST_LANGUAGES",
           "wordfreq_languages", "language_words", "Alphabet", "WordClasses", "LanguageSplit", "load_languages",
           "sample_word_episodes", "WordEpisodeSampler", "word_episodes", "ngram_nearest_neighbour"]

#: Index of the padding after the end of a word.
PAD = 0
#: Index of a character that is not in the alphabet.
UNKNOWN = 1

#: wordfreq's languages written in the Latin script ('sh': Serbo-Croatian, whose list is in Latin letters).
LATIN_SCRIPT_LANGUAGES = ("ca", "cs", "da", "de", "en", "es", "fi", "fil", "fr", "hu", "id", "is", "it", "lt", "lv",
                          "ms", "nb", "nl", "pl", "pt", "ro", "sh", "sk", "sl", "sv", "tr", "vi")
#: Held out for the final test: Catalan, Danish, Latvian, Malay, Portuguese, Slovak.
TEST_LANGUAGES = ("ca", "da", "lv", "ms", "pt", "sk")
#: Held out for choices made before the test: Czech, Spanish, Finnish, Dutch, Swedish.
VALIDATION_LANGUAGES = ("cs", "es", "fi", "nl", "sv")
#: The other 16 Latin-script languages: the only ones meta-training sees.
TRAIN_LANGUAGES = tuple(code for code in LATIN_SCRIPT_LANGUAGES
                        if code not in TEST_LANGUAGES and code not in VALIDATION_LANGUAGES)


def _wordfreq():
    try:
        import wordfreq
    except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("metatut.data.languages needs the wordfreq package (its wheel holds the word "
                                  "lists): pip install wordfreq, or the course extra: pip install 'metatut[course]'",
                                  name="wordfreq") from err
    return wordfreq


def wordfreq_languages() -> list[str]:
    """The language codes that wordfreq has a word list for, sorted (42 in wordfreq 3.1).

    wordfreq itself answers an unknown code with the nearest language it has (``'hr'`` -> ``'sh'``, ``'la'`` ->
    ``'it'``) and only a warning; :func:`language_words` refuses codes not in this list instead.

    Example::

        >>> codes = wordfreq_languages()
        >>> {"en", "fr", "ru", "zh"} <= set(codes), set(LATIN_SCRIPT_LANGUAGES) <= set(codes)
        (True, True)
    """
    return sorted(_wordfreq().available_languages())


def _check_languages(name: str, languages, *, minimum: int = 1) -> tuple[str, ...]:
    if isinstance(languages, str) or not isinstance(languages, Iterable):
        raise TypeError(f"{name} must be a sequence of language codes such as ('en', 'fr') (got {languages!r})")
    codes = tuple(languages)
    if not all(isinstance(code, str) for code in codes):
        raise TypeError(f"{name} must hold language codes (str) (got {codes!r})")
    repeated = sorted({code for code in codes if codes.count(code) > 1})
    if repeated:
        raise ValueError(f"{name} lists these languages more than once: {repeated}")
    if len(codes) < minimum:
        raise ValueError(f"{name} must hold at least {minimum} languages (got {len(codes)}: {list(codes)})")
    available = wordfreq_languages()
    unknown = [code for code in codes if code not in available]
    if unknown:
        raise ValueError(f"{name}: wordfreq has no word list for {unknown}; available languages: {available}")
    return codes


def _normal(word: str) -> str:
    return unicodedata.normalize("NFC", word)


def language_words(languages: Sequence[str], *, words_per_language: int = 2_000, top_n: int = 10_000,
                   min_length: int = 3, max_length: int = 12) -> dict[str, list[str]]:
    """The filtered words of each language: ``{code: [words_per_language words, most frequent first]}``.

    Of the ``top_n`` most frequent entries of each wordfreq list, keep the words of letters only
    (``str.isalpha`` after NFC normalisation) with ``min_length..max_length`` letters, and drop every word that
    is kept in another of ``languages`` too: no word belongs to two classes. Raises ``ValueError`` for a code
    wordfreq does not have (listing those it has) and for a language left with fewer than
    ``words_per_language`` words (raise ``top_n`` or lower ``words_per_language``).

    Example::

        >>> words = language_words(["en", "de"], words_per_language=5)
        >>> words["en"], words["de"]
        (['were', 'had', 'their', 'which', 'been'], ['das', 'ich', 'ist', 'nicht', 'mit'])
        >>> language_words(["en", "xx"])
        Traceback (most recent call last):
        ...
        ValueError: languages: wordfreq has no word list for ['xx']; available languages: ['ar', 'bg', ...]
    """
    codes = _check_languages("languages", languages, minimum=1)
    check_positive_int("words_per_language", words_per_language)
    check_positive_int("top_n", top_n)
    check_positive_int("min_length", min_length)
    check_positive_int("max_length", max_length, minimum=min_length)
    wordfreq = _wordfreq()
    kept: dict[str, list[str]] = {}
    for code in codes:
        seen: dict[str, None] = {}
        for entry in wordfreq.top_n_list(code, top_n):
            word = _normal(entry)
            if word.isalpha() and min_length <= len(word) <= max_length:
                seen.setdefault(word)
        kept[code] = list(seen)
    owners: dict[str, int] = {}
    for words in kept.values():
        for word in words:
            owners[word] = owners.get(word, 0) + 1
    result = {}
    for code, words in kept.items():
        unique = [word for word in words if owners[word] == 1]
        if len(unique) < words_per_language:
            raise ValueError(f"language {code!r} has only {len(unique)} words left after filtering (letters only, "
                             f"{min_length}..{max_length} letters, not shared with {[c for c in codes if c != code]}) "
                             f"among its top_n={top_n} entries, fewer than words_per_language={words_per_language}: "
                             "raise top_n or lower words_per_language")
        result[code] = unique[:words_per_language]
    return result


class Alphabet:
    """The symbols of words in Unicode NFD (letters and combining marks), each with an index from 2 on.

    Index :data:`PAD` (0) pads words to a common length, :data:`UNKNOWN` (1) stands for any symbol not in the
    alphabet. ``len(alphabet)`` is the number of indices, the size an ``nn.Embedding`` needs.

    Example::

        >>> alphabet = Alphabet.from_words(["pão", "casa"])
        >>> alphabet.symbols == ("a", "c", "o", "p", "s", "\\u0303"), len(alphabet)
        (True, 8)
        >>> alphabet.encode(["pão", "cão", "sol"])
        tensor([[5, 2, 7, 4],
                [3, 2, 7, 4],
                [6, 4, 1, 0]])
        >>> alphabet.decode(alphabet.encode(["pão", "casa"]))
        ['pão', 'casa']
    """

    def __init__(self, symbols: Iterable[str]) -> None:
        symbols = tuple(symbols)
        if not all(isinstance(s, str) and len(s) == 1 for s in symbols) or len(set(symbols)) != len(symbols):
            raise ValueError("symbols must be distinct single characters")
        self.symbols = symbols
        self.index = {s: i + 2 for i, s in enumerate(symbols)}

    @classmethod
    def from_words(cls, words: Iterable[str]) -> "Alphabet":
        """Every symbol of ``words`` (after NFD decomposition), sorted by code point.

        Example::

            >>> Alphabet.from_words(["ab", "ba"]).symbols
            ('a', 'b')
        """
        return cls(sorted({s for word in words for s in unicodedata.normalize("NFD", word)}))

    def __len__(self) -> int:
        return len(self.symbols) + 2

    def __repr__(self) -> str:
        return f"Alphabet({len(self.symbols)} symbols + PAD + UNKNOWN)"

    def length(self, word: str) -> int:
        """The number of indices ``word`` takes (its NFD length).

        Example::

            >>> Alphabet(["a"]).length("ã")
            2
        """
        return len(unicodedata.normalize("NFD", word))

    def encode(self, words: Sequence[str], length: int | None = None) -> Tensor:
        """Words to an int64 tensor ``[len(words), length]`` (``length``: default the longest word's), padded with
        :data:`PAD`; a word longer than ``length`` raises ``ValueError``.

        Example::

            >>> Alphabet(["a", "b"]).encode(["ab", "c"], length=3)
            tensor([[2, 3, 0],
                    [1, 0, 0]])
        """
        decomposed = [unicodedata.normalize("NFD", word) for word in words]
        longest = max((len(d) for d in decomposed), default=0)
        length = longest if length is None else check_positive_int("length", length)
        if longest > length:
            raise ValueError(f"length={length} is shorter than the longest word ({longest} symbols in NFD)")
        rows = [[self.index.get(s, UNKNOWN) for s in word] + [PAD] * (length - len(word)) for word in decomposed]
        return torch.tensor(rows, dtype=torch.int64).view(len(words), length)

    def decode(self, ids: Tensor) -> list[str]:
        """``[words, length]`` indices back to words (NFC; :data:`UNKNOWN` shows as ``'?'``).

        Example::

            >>> Alphabet(["a", "b"]).decode(torch.tensor([[3, 2, 1, 0]]))
            ['ba?']
        """
        table = {PAD: "", UNKNOWN: "?", **{i: s for s, i in self.index.items()}}
        return [unicodedata.normalize("NFC", "".join(table[int(i)] for i in row)) for row in ids.reshape(-1, ids.shape[-1])]


@dataclass(frozen=True)
class WordClasses:
    """The words of some languages, one class per language: ``ids [classes, per_class, length]`` (int64, the
    :class:`Alphabet` indices of ``words[c][i]``), ``languages`` the code of each class.

    Example::

        >>> alphabet = Alphabet.from_words(["ab", "ba", "abc", "cab"])
        >>> classes = WordClasses(("xx", "yy"), (("ab", "ba"), ("abc", "cab")), alphabet.encode(["ab", "ba", "abc", "cab"]).view(2, 2, 3))
        >>> len(classes), classes.per_class, classes.length
        (2, 2, 3)
    """

    languages: tuple[str, ...]
    words: tuple[tuple[str, ...], ...]
    ids: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.ids, Tensor) or self.ids.dim() != 3 or self.ids.dtype != torch.int64:
            raise ValueError(f"ids must be an int64 tensor [classes, per_class, length] (got "
                             f"{getattr(self.ids, 'dtype', type(self.ids))} {tuple(getattr(self.ids, 'shape', ()))})")
        if len(self.languages) != self.ids.shape[0] or len(self.words) != self.ids.shape[0] \
                or any(len(w) != self.ids.shape[1] for w in self.words):
            raise ValueError("languages, words and ids must describe the same classes and words per class")

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def per_class(self) -> int:
        return self.ids.shape[1]

    @property
    def length(self) -> int:
        return self.ids.shape[2]

    def to(self, device) -> "WordClasses":
        """The same words with ``ids`` on ``device``.

        Example::

            >>> WordClasses(("xx", "yy"), (("a",), ("b",)), torch.ones(2, 1, 1, dtype=torch.int64)).to("cpu").ids.device
            device(type='cpu')
        """
        return WordClasses(self.languages, self.words, self.ids.to(device))


@dataclass(frozen=True)
class LanguageSplit:
    """Disjoint sets of languages for meta-training, validation and test, with the :class:`Alphabet` of the
    training words (held-out words are encoded with it: a symbol only they use becomes :data:`UNKNOWN`).

    Example::

        >>> split = load_languages(["en", "de"], ["nl", "fr"], ["it", "es"], words_per_language=50, top_n=1_000)
        >>> split
        LanguageSplit(train ['en', 'de'], validation ['nl', 'fr'], test ['it', 'es']: 50 words each, length 8)
    """

    train: WordClasses
    validation: WordClasses
    test: WordClasses
    alphabet: Alphabet

    def __repr__(self) -> str:
        return (f"LanguageSplit(train {list(self.train.languages)}, validation {list(self.validation.languages)}, "
                f"test {list(self.test.languages)}: {self.train.per_class} words each, length {self.train.length})")

    def unknown_rate(self, part: str = "test") -> float:
        """Fraction of the symbols of ``part``'s words (``'train'``, ``'validation'``, ``'test'``) that are
        :data:`UNKNOWN` (0 for the training words by construction).

        Example::

            >>> split = load_languages(["en", "de"], ["nl", "fr"], ["it", "es"], words_per_language=50, top_n=1_000)
            >>> split.unknown_rate("train")
            0.0
        """
        if part not in ("train", "validation", "test"):
            raise ValueError(f"part must be 'train', 'validation' or 'test' (got {part!r})")
        ids = getattr(self, part).ids
        return float((ids == UNKNOWN).sum() / (ids != PAD).sum())


def load_languages(train: Sequence[str] = TRAIN_LANGUAGES, validation: Sequence[str] = VALIDATION_LANGUAGES,
                   test: Sequence[str] = TEST_LANGUAGES, *, words_per_language: int = 2_000, top_n: int = 10_000,
                   min_length: int = 3, max_length: int = 12) -> LanguageSplit:
    """Load and encode the words of three disjoint sets of languages (default: the course's Latin-script split).

    The words of all the languages are filtered together (:func:`language_words`: no word is kept in two
    languages, whatever split they are in); the alphabet is built from the training words only; every word is
    padded to the longest word's length. Refuses a language named in two splits and a split of fewer than 2
    languages. Returns a :class:`LanguageSplit` of three :class:`WordClasses` with
    ``ids [languages, words_per_language, length]``.

    Example::

        >>> split = load_languages(["en", "de", "nl"], ["fr", "it"], ["es", "pt"], words_per_language=100)
        >>> split.train.ids.shape, split.test.languages, split.test.words[1][:3]
        (torch.Size([3, 100, 11]), ('es', 'pt'), ('não', 'uma', 'você'))
        >>> load_languages(["en", "de"], ["fr", "it"], ["es", "de"])
        Traceback (most recent call last):
        ...
        ValueError: the splits must not share languages: train and test share ['de']
    """
    parts = {name: _check_languages(name, codes, minimum=2)
             for name, codes in (("train", train), ("validation", validation), ("test", test))}
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = [code for code in parts[a] if code in parts[b]]
            if shared:
                raise ValueError(f"the splits must not share languages: {a} and {b} share {shared}")
    every = [code for codes in parts.values() for code in codes]
    words = language_words(every, words_per_language=words_per_language, top_n=top_n, min_length=min_length,
                           max_length=max_length)
    alphabet = Alphabet.from_words(word for code in parts["train"] for word in words[code])
    length = max(alphabet.length(word) for code in every for word in words[code])

    def classes(codes: tuple[str, ...]) -> WordClasses:
        ids = torch.stack([alphabet.encode(words[code], length) for code in codes])
        return WordClasses(codes, tuple(tuple(words[code]) for code in codes), ids)

    return LanguageSplit(classes(parts["train"]), classes(parts["validation"]), classes(parts["test"]), alphabet)


# ------------------------------------------------------------------------------------------------ episodes
def _as_ids(words) -> Tensor:
    ids = getattr(words, "ids", words)
    if not isinstance(ids, Tensor) or ids.dim() != 3 or ids.dtype != torch.int64:
        raise TypeError("words must be metatut.data.WordClasses or an int64 tensor [classes, per_class, length] "
                        f"(got {getattr(ids, 'dtype', type(ids))} {tuple(getattr(ids, 'shape', ()))})")
    return ids


def _check_episode(ids: Tensor, num_tasks, n_way, k_shot, q_query) -> None:
    check_episode(ids, num_tasks, n_way, k_shot, q_query, classes_are="languages",
                  examples_are="words per language")


def _check_device(generator, device: torch.device) -> None:
    check_generator_device(generator, device, "words")


def _draw(ids: Tensor, num_tasks: int, n_way: int, k_shot: int, q_query: int, generator) -> TaskBatch:
    return gather_episodes(ids, num_tasks, n_way, k_shot, q_query, generator)


def sample_word_episodes(words, num_tasks: int, n_way: int, k_shot: int, q_query: int, *,
                         generator: torch.Generator | None = None) -> TaskBatch:
    """Draw ``num_tasks`` N-way K-shot episodes of words with ``q_query`` query words per language.

    ``words``: :class:`WordClasses` or ``ids [classes, per_class, length]`` (int64). Languages are drawn without
    replacement and relabelled ``0..N-1`` in the order drawn; the ``K + Q`` words of each are distinct (the
    first ``K`` are the support). Returns a :class:`metatut.TaskBatch` with ``support_x [tasks, N*K, length]``
    (int64), ``support_y [tasks, N*K]`` (``0,..,0, 1,..,1, ...``), ``query_x [tasks, N*Q, length]``,
    ``query_y [tasks, N*Q]``, ``info['classes'] [tasks, N]`` (the class index of each label) and
    ``info['examples'] [tasks, N, K+Q]`` (the word index within each class).

    Example::

        >>> ids = torch.randint(2, 30, (6, 40, 12))                  # 6 languages of 40 words
        >>> batch = sample_word_episodes(ids, 4, n_way=5, k_shot=2, q_query=3, generator=torch.Generator().manual_seed(0))
        >>> batch.support_x.shape, batch.support_x.dtype, batch.query_y.shape
        (torch.Size([4, 10, 12]), torch.int64, torch.Size([4, 15]))
        >>> batch.support_y[0]
        tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    """
    ids = _as_ids(words)
    _check_episode(ids, num_tasks, n_way, k_shot, q_query)
    _check_device(generator, ids.device)
    return _draw(ids, num_tasks, n_way, k_shot, q_query, generator)


class WordEpisodeSampler:
    """``sampler(generator) -> TaskBatch`` of word episodes with fixed settings, e.g. for :func:`metatut.meta_train`
    (the words' counterpart of :class:`metatut.EpisodeSampler`).

    Example::

        >>> sampler = WordEpisodeSampler(torch.randint(2, 30, (6, 40, 12)), n_way=3, k_shot=2, q_query=1, num_tasks=4)
        >>> sampler
        WordEpisodeSampler(3-way 2-shot, 1 queries per class, 4 tasks, 6 languages on cpu)
        >>> sampler(torch.Generator().manual_seed(0)).support_x.shape
        torch.Size([4, 6, 12])
    """

    def __init__(self, words, *, n_way: int, k_shot: int, q_query: int, num_tasks: int = 1, device=None) -> None:
        ids = _as_ids(words)
        _check_episode(ids, num_tasks, n_way, k_shot, q_query)
        self.ids = ids.to(device) if device is not None else ids
        self.n_way, self.k_shot, self.q_query, self.num_tasks = n_way, k_shot, q_query, num_tasks

    def __repr__(self) -> str:
        return (f"WordEpisodeSampler({self.n_way}-way {self.k_shot}-shot, {self.q_query} queries per class, "
                f"{self.num_tasks} tasks, {self.ids.shape[0]} languages on {self.ids.device})")

    def __call__(self, generator: torch.Generator | None = None) -> TaskBatch:
        _check_device(generator, self.ids.device)
        return _draw(self.ids, self.num_tasks, self.n_way, self.k_shot, self.q_query, generator)


def word_episodes(words, episodes: int, n_way: int, k_shot: int, q_query: int, *, seed: int = 2015,
                  chunk: int = 100) -> list[TaskBatch]:
    """Seeded evaluation episodes, drawn ``chunk`` at a time from one generator (as :func:`metatut.held_out_episodes`:
    the first ``n`` episodes do not depend on ``episodes >= n``). Returns a list of :class:`metatut.TaskBatch` of at
    most ``chunk`` tasks each.

    Example::

        >>> ids = torch.randint(2, 30, (6, 40, 12))
        >>> [b.num_tasks for b in word_episodes(ids, 5, n_way=3, k_shot=1, q_query=2, chunk=2)]
        [2, 2, 1]
    """
    check_positive_int("episodes", episodes)
    check_positive_int("chunk", chunk)
    ids = _as_ids(words)
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    return [sample_word_episodes(ids, chunk, n_way, k_shot, q_query, generator=generator)[: min(chunk, episodes - s)]
            for s in range(0, episodes, chunk)]


# ------------------------------------------------------------------------------------------------ yardstick
def _ngram_counts(ids: Tensor, orders: tuple[int, ...]) -> Tensor:
    """Counts of the character n-grams of words ``[words, length]`` (a boundary :data:`PAD` before and after each
    word) as a dense ``[words, distinct n-grams]`` float matrix (exact codes, no hashing)."""
    words, length = ids.shape
    base = int(ids.max()) + 1
    padded = torch.cat([ids.new_zeros(words, 1), ids, ids.new_zeros(words, 1)], dim=1)   # [words, length + 2]
    ends = (ids != PAD).sum(dim=1) + 1                          # index of the closing boundary in ``padded``
    codes, rows = [], []
    for n in orders:
        windows = padded.unfold(1, n, 1)                        # [words, length + 3 - n, n]
        code = (windows * base ** torch.arange(n, device=ids.device)).sum(-1) * len(orders) + orders.index(n)
        valid = torch.arange(windows.shape[1], device=ids.device) + n - 1 <= ends[:, None]
        codes.append(code[valid])
        rows.append(torch.arange(words, device=ids.device)[:, None].expand_as(code)[valid])
    unique, column = torch.unique(torch.cat(codes), return_inverse=True)
    counts = torch.zeros(words, len(unique), device=ids.device)
    counts.index_put_((torch.cat(rows), column), torch.ones_like(column, dtype=counts.dtype), accumulate=True)
    return counts


def ngram_nearest_neighbour(support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                            orders: Sequence[int] = (1, 2, 3)) -> Tensor:
    """A yardstick with nothing learned: each query word takes the label of the support word whose character
    n-gram counts (``orders``; the word's start and end count as a character) have the largest cosine similarity.

    ``support_x [tasks, S, length]``, ``support_y [tasks, S]``, ``query_x [tasks, M, length]`` (int64 indices)
    -> predicted labels ``[tasks, M]``.

    Example::

        >>> alphabet = Alphabet.from_words(["coração", "schwester", "ação", "schule"])
        >>> support = alphabet.encode(["coração", "schwester"])[None]         # [1 task, 2 words, length]
        >>> query = alphabet.encode(["ação", "schule"])[None]
        >>> ngram_nearest_neighbour(support, torch.tensor([[0, 1]]), query)
        tensor([[0, 1]])
    """
    orders = tuple(int(n) for n in orders)
    if not orders or any(n < 1 for n in orders) or len(set(orders)) != len(orders):
        raise ValueError(f"orders must be distinct n-gram lengths >= 1, e.g. (1, 2, 3) (got {orders})")
    if support_x.dim() != 3 or query_x.dim() != 3 or support_y.shape != support_x.shape[:2]:
        raise ValueError(f"support_x and query_x must be [tasks, words, length] and support_y [tasks, words] (got "
                         f"{tuple(support_x.shape)}, {tuple(query_x.shape)} and {tuple(support_y.shape)})")
    length = max(support_x.shape[2], query_x.shape[2])
    support_x = F.pad(support_x, (0, length - support_x.shape[2]), value=PAD)
    query_x = F.pad(query_x, (0, length - query_x.shape[2]), value=PAD)
    predictions = []
    for t in range(support_x.shape[0]):
        shots = support_x.shape[1]
        counts = _ngram_counts(torch.cat([support_x[t], query_x[t]]), orders)
        unit = counts / counts.norm(dim=1, keepdim=True).clamp_min(1e-12)
        similarity = unit[shots:] @ unit[:shots].T                                      # [M, S]
        predictions.append(support_y[t][similarity.argmax(dim=1)])
    return torch.stack(predictions)
