"""Warm start (tasks/warm_start.py): the grown vocabularies, the champion's rows and weights
in the new model, identical predictions before the first step, retirement, and a refused
architecture change. The champion is the tiny model the step tests train once
(`uninterrupted`). A warm-started training run that is saved, registered with its lineage,
loaded and served is tested once, end to end, in tests/flows/test_nightly.py."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.inputs import predict_split
from tasks.warm_start import (
    WarmStart,
    read_source,
)
from tests.tasks.conftest import MODEL, TRAIN

NEW_ID = 10**12  # an id no generated data set uses


@pytest.fixture(scope="module")
def source(uninterrupted):
    """The trained tiny model read as a warm start's champion (version "7")."""
    out, result = uninterrupted
    return read_source(result.model_path, "7")


def _today(source, field="205", drop=3):
    """Today's vocabularies: the champion's, with `drop` ids of `field` unseen and one new."""
    today = {f: ids.copy() for f, ids in source.vocab.items()}
    today[field] = np.append(today[field][drop:], NEW_ID)
    return today


def _warm_model(warm):
    from tasks.train import compiled_model

    model = compiled_model(MODEL, TRAIN, warm.vocab)
    warm.apply(model)
    return model


def test_known_ids_keep_their_rows_and_a_new_id_gets_its_own(source):
    warm = WarmStart(source)
    vocab = warm.grow(_today(source))
    assert NEW_ID in vocab["205"] and np.all(np.isin(source.vocab["205"], vocab["205"]))
    assert warm.stats["205"] == {"known": len(source.vocab["205"]), "new": 1, "retired": 0}
    model = _warm_model(warm)
    old = source.tables["embedding_205"]
    new = model.get_layer("embedding_205").embeddings.numpy()
    lookup = model.get_layer("lookup_205")
    known = source.vocab["205"][[0, 5, -1]]
    old_rows = np.searchsorted(source.vocab["205"], known) + 1
    new_rows = lookup(known).numpy()
    np.testing.assert_array_equal(new[new_rows], old[old_rows])  # learnt rows kept
    np.testing.assert_array_equal(new[0], old[0])  # the OOV row too
    new_row = int(lookup(np.array([NEW_ID])).numpy()[0])
    assert new_row != 0 and new_row not in set(new_rows)  # a row of its own ...
    np.testing.assert_array_equal(new[new_row], old[0])  # ... started from the OOV row
    assert new.shape[0] == old.shape[0] + 1


def test_predictions_are_the_champions_before_the_first_step(source, uninterrupted, ingested):
    import keras

    import models.esmm  # noqa: F401  (custom layers)

    _, result = uninterrupted
    champion = keras.models.load_model(result.model_path, compile=False)
    warm = WarmStart(source)
    warm.grow(_today(source))
    model = _warm_model(warm)
    before, after = (
        predict_split(champion, ingested / "test"),
        predict_split(model, ingested / "test"),
    )
    for key in ("p_ctr", "p_cvr", "p_ctcvr"):
        np.testing.assert_allclose(after[key], before[key], rtol=1e-6, atol=1e-7)


def test_ids_unseen_for_k_nights_retire(source):
    """Ages count nights unseen; an id reaching `retire_after` is dropped, a seen one resets."""
    vocab = source.vocab["205"]
    ages = {f: np.zeros(len(ids), dtype=np.int64) for f, ids in source.vocab.items()}
    ages["205"][:3] = [1, 0, 5]  # first three ids: unseen today (see _today)
    ages["205"][3] = 4  # seen today: back to 0
    aged = type(source)(source.version, source.vocab, source.tables, source.weights, ages)
    warm = WarmStart(aged, retire_after=2)
    grown = warm.grow(_today(source))["205"]
    assert vocab[0] not in grown and vocab[2] not in grown  # 2 and 6 nights unseen: retired
    assert vocab[1] in grown  # 1 night unseen: kept
    assert warm.stats["205"]["retired"] == 2
    at = np.searchsorted(grown, vocab[[1, 3]])
    np.testing.assert_array_equal(warm.ages["205"][at], [1, 0])


def test_a_changed_architecture_is_refused_by_name(source):
    from tasks.train import compiled_model

    warm = WarmStart(source)
    warm.grow(_today(source))
    wider = MODEL.model_copy(update={"embedding_dim": 6})
    with pytest.raises(ValueError, match="embedding_.*train.warm_start: none"):
        warm.apply(compiled_model(wider, TRAIN, warm.vocab))
