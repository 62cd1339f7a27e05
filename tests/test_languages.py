"""metatut.data.languages: word lists from wordfreq, the language split, word episodes and the n-gram yardstick."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("wordfreq")

from metatut.data import languages as lang  # noqa: E402
from metatut.data.languages import (  # noqa: E402
    PAD,
    UNKNOWN,
    Alphabet,
    WordEpisodeSampler,
    language_words,
    load_languages,
    ngram_nearest_neighbour,
    sample_word_episodes,
    word_episodes,
)

SMALL = dict(words_per_language=60, top_n=2_000)


@pytest.fixture(scope="module")
def split():
    """The course's split (all 27 Latin-script languages), small: 60 words per language."""
    return load_languages(**SMALL)


def test_course_split_is_disjoint_and_latin():
    train, val, test = map(set, (lang.TRAIN_LANGUAGES, lang.VALIDATION_LANGUAGES, lang.TEST_LANGUAGES))
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(lang.LATIN_SCRIPT_LANGUAGES)
    assert len(test) == 6 and len(val) == 5 and len(train) == 16
    assert set(lang.LATIN_SCRIPT_LANGUAGES) <= set(lang.wordfreq_languages())


def test_held_out_languages_never_in_training(split):
    assert split.train.languages == lang.TRAIN_LANGUAGES
    assert split.test.languages == lang.TEST_LANGUAGES
    train_words = {w for words in split.train.words for w in words}
    for part in (split.validation, split.test):
        assert not set(part.languages) & set(split.train.languages)
        assert not train_words & {w for words in part.words for w in words}
    # whatever the training sampler draws comes from the training tensor only
    batch = WordEpisodeSampler(split.train, n_way=5, k_shot=2, q_query=3, num_tasks=20)(torch.Generator().manual_seed(0))
    drawn = set(split.alphabet.decode(torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)))
    assert drawn <= train_words


def test_shapes_alphabet_and_no_unknown_symbols(split):
    assert split.train.ids.shape[:2] == (16, 60) and split.test.ids.shape[:2] == (6, 60)
    assert split.train.ids.dtype == torch.int64 and split.train.length == split.test.length
    assert split.unknown_rate("train") == 0.0
    assert split.unknown_rate("test") == 0.0       # NFD: held-out diacritics are marks training languages use
    for part in (split.train, split.test):
        assert split.alphabet.decode(part.ids[0]) == list(part.words[0])
    with pytest.raises(ValueError, match="part must be"):
        split.unknown_rate("dev")


def test_word_filter():
    words = language_words(["en", "de", "fr"], words_per_language=300, top_n=3_000, min_length=3, max_length=8)
    everything = [w for ws in words.values() for w in ws]
    assert len(everything) == len(set(everything)) == 900           # no word in two languages, none repeated
    assert all(w.isalpha() and 3 <= len(w) <= 8 for w in everything)
    assert "the" not in words["en"]                              # in the German list too: ambiguous, dropped
    import wordfreq

    ranks = {w: i for i, w in enumerate(wordfreq.top_n_list("de", 3_000))}
    assert [ranks[w] for w in words["de"]] == sorted(ranks[w] for w in words["de"])   # most frequent first


def test_language_errors():
    with pytest.raises(ValueError, match=r"no word list for \['xx'\]; available languages: \[.*'en'"):
        language_words(["en", "xx"])
    with pytest.raises(TypeError, match="sequence of language codes"):
        language_words("en")
    with pytest.raises(ValueError, match="more than once"):
        language_words(["en", "en"])
    with pytest.raises(ValueError, match=r"language 'en' has only \d+ words left .* raise top_n"):
        language_words(["en", "de"], words_per_language=500, top_n=500)
    with pytest.raises(ValueError, match="max_length must be an int >= 5"):
        language_words(["en"], min_length=5, max_length=4)
    with pytest.raises(ValueError, match=r"train and validation share \['fr'\]"):
        load_languages(["en", "fr"], ["fr", "it"], ["es", "pt"], **SMALL)
    with pytest.raises(ValueError, match="test must hold at least 2 languages"):
        load_languages(["en", "fr"], ["de", "it"], ["es"], **SMALL)


def test_episodes_distinct_classes_disjoint_support_and_query(split):
    n_way, k_shot, q_query = 5, 3, 4
    batch = sample_word_episodes(split.test, 50, n_way, k_shot, q_query, generator=torch.Generator().manual_seed(1))
    assert batch.support_x.shape == (50, n_way * k_shot, split.test.length)
    assert batch.query_x.shape == (50, n_way * q_query, split.test.length)
    expected = torch.arange(n_way).repeat_interleave(k_shot)
    assert torch.equal(batch.support_y, expected.expand(50, -1))
    assert torch.equal(batch.query_y, torch.arange(n_way).repeat_interleave(q_query).expand(50, -1))
    classes, examples = batch.info["classes"], batch.info["examples"]
    assert all(len(set(c.tolist())) == n_way for c in classes)                       # distinct languages
    assert all(len(set(e.tolist())) == k_shot + q_query for e in examples.flatten(0, 1))  # distinct words
    for t in range(50):
        support = split.alphabet.decode(batch.support_x[t])
        query = split.alphabet.decode(batch.query_x[t])
        assert not set(support) & set(query)
        for i, word in enumerate(support):                     # each word belongs to its label's language
            assert word in split.test.words[classes[t, batch.support_y[t, i]]]
        for i, word in enumerate(query):
            assert word in split.test.words[classes[t, batch.query_y[t, i]]]
    # labels are a random relabelling: the language behind label 0 varies
    assert len(set(classes[:, 0].tolist())) > 1


def test_episodes_are_seeded(split):
    a = word_episodes(split.test, 7, 3, 1, 2, seed=5, chunk=3)
    b = word_episodes(split.test, 3, 3, 1, 2, seed=5, chunk=3)
    assert [x.num_tasks for x in a] == [3, 3, 1]
    assert torch.equal(a[0].support_x, b[0].support_x) and torch.equal(a[0].query_x, b[0].query_x)
    sampler = WordEpisodeSampler(split.train, n_way=4, k_shot=2, q_query=2, num_tasks=3)
    first, second = (sampler(torch.Generator().manual_seed(9)) for _ in range(2))
    assert torch.equal(first.query_x, second.query_x)


def test_episode_errors(split):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="n_way must be an int >= 2"):
        sample_word_episodes(split.test, 2, 1, 1, 1, generator=g)
    with pytest.raises(ValueError, match=r"n_way must be an int in \[2, 6\]"):
        sample_word_episodes(split.test, 2, 7, 1, 1, generator=g)
    with pytest.raises(ValueError, match="k_shot must be an int >= 1"):
        sample_word_episodes(split.test, 2, 5, 0, 1, generator=g)
    with pytest.raises(ValueError, match="k_shot \\+ q_query must be at most 60"):
        WordEpisodeSampler(split.test, n_way=5, k_shot=30, q_query=31)
    with pytest.raises(TypeError, match="int64 tensor"):
        sample_word_episodes(torch.zeros(3, 4, 5), 2, 2, 1, 1)
    with pytest.raises(TypeError, match="torch.Generator"):
        sample_word_episodes(split.test, 2, 2, 1, 1, generator=0)


def test_alphabet_encoding():
    alphabet = Alphabet.from_words(["pão", "casa"])
    ids = alphabet.encode(["pão", "xã"], length=5)
    assert ids.tolist()[1] == [UNKNOWN, alphabet.index["a"], alphabet.index["\u0303"], PAD, PAD]
    assert alphabet.decode(ids) == ["pão", "?ã"]
    with pytest.raises(ValueError, match="length=2 is shorter"):
        alphabet.encode(["casa"], length=2)


def test_ngram_nearest_neighbour(split):
    batch = word_episodes(split.test, 20, 5, 3, 3, seed=0)[0]
    predicted = ngram_nearest_neighbour(batch.support_x, batch.support_y, batch.query_x)
    assert predicted.shape == batch.query_y.shape and int(predicted.max()) < 5
    # a query identical to a support word takes that word's label
    same = ngram_nearest_neighbour(batch.support_x, batch.support_y, batch.support_x)
    assert torch.equal(same, batch.support_y)
    assert (predicted == batch.query_y).float().mean() > 0.2 + 0.05        # better than chance on 60 x 15 queries
    with pytest.raises(ValueError, match="orders must be"):
        ngram_nearest_neighbour(batch.support_x, batch.support_y, batch.query_x, orders=(0,))
