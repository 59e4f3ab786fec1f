"""Initial embeddings of a cross's history and item tables from their co-occurrence.

Each cross of the format pairs a user's behaviour list with an item field of the same kind
(`models.features.CROSSES`: 109_14, the categories of the user's last 14 days, with 206,
the shown item's category; shops 110_14 with 207; ...). The model reads that pair through
the dot product of the pooled history with the item's embedding (`model.interactions`),
which from a random start is a bilinear term that one pass over the data barely learns,
and a second pass overfits the id tables.

Ids that appear in the same contexts are alike: a user's history holds the categories
of their taste, and the items shown to them lean the same way. So before training, the
ids of both tables are treated as one vocabulary, each training context as one "document"
(its history list plus the item ids of its impressions), and the positive pointwise mutual
information of co-occurring ids is factorised by a truncated eigendecomposition: the
count-based equivalent of item2vec / word2vec (Levy & Goldberg, NeurIPS 2014). Each id
then starts from a vector in one shared space, scaled to a chosen spread, and the model's
dots start meaningful. Only rows of ids seen in the sampled contexts are set; the rest
keep their random start.

The sample of contexts is bounded (`max_contexts`, drawn from the seed) so the cost stays
a few seconds at any data size: a context with L history entries adds L^2 pairs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.features import COMMON_INDEX_KEY, CROSSES, ids_key
from tasks.inputs import SplitReader

_DENSE_LIMIT = 4000  # joint vocabularies up to this size use a dense eigendecomposition


@dataclass(frozen=True)
class CooccurrenceTables:
    """Initial rows of a cross's history and item tables (row 0, the OOV bucket, unset)."""

    cross: str
    history: np.ndarray  # (len(history vocab) + 1, dim)
    item: np.ndarray  # (len(item vocab) + 1, dim)
    history_seen: np.ndarray  # bool per row: the id occurred in the sample
    item_seen: np.ndarray
    contexts: int  # contexts in the sample
    seconds: float

    def summary(self) -> str:
        history_field, item_field = CROSSES[self.cross]
        return (
            f"co-occurrence init of {history_field} x {item_field} (cross {self.cross}): "
            f"{int(self.history_seen.sum())} + {int(self.item_seen.sum())} ids from "
            f"{self.contexts} contexts in {self.seconds:.1f} s"
        )


def _flat(lists: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(row of each entry, raw id of each entry) of a list column."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    return parent, values


def _rows(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Table row of each raw id (the sorted vocabulary's index + 1; 0 for OOV)."""
    at = np.minimum(np.searchsorted(vocab, ids), max(len(vocab) - 1, 0))
    hit = (vocab[at] == ids) if len(vocab) else np.zeros(len(ids), dtype=bool)
    return np.where(hit, at + 1, 0)


def _top_eigenvectors(matrix, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest k eigenvalues (clipped at 0) and eigenvectors of a symmetric sparse matrix."""
    n = matrix.shape[0]
    if n <= _DENSE_LIMIT or k >= n - 1:
        values, vectors = np.linalg.eigh(matrix.toarray())
    else:
        from scipy.sparse.linalg import eigsh

        v0 = np.random.default_rng(seed).uniform(-1.0, 1.0, n)
        values, vectors = eigsh(matrix.astype(np.float64), k=k, which="LA", v0=v0)
    order = np.argsort(-values)[:k]
    vectors = vectors[:, order]
    # A fixed sign per vector (largest entry positive), so equal inputs give equal tables.
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    return np.maximum(values[order], 0.0), vectors * np.where(signs == 0, 1.0, signs)


def _sampled_contexts(n_contexts: int, max_contexts: int, rng: np.random.Generator) -> np.ndarray:
    """Bool per context: in the sample (all of them when there are at most `max_contexts`)."""
    keep = np.ones(n_contexts, dtype=bool)
    if n_contexts > max_contexts:
        keep[:] = False
        keep[rng.choice(n_contexts, size=max_contexts, replace=False)] = True
    return keep


def _documents(
    reader: SplitReader,
    vocab: Mapping[str, np.ndarray],
    history_field: str,
    item_field: str,
    keep: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(document, token) of every known id in the sampled contexts: the history ids as
    tokens 1 .. len(history vocab), the item ids after them (offset by the history table's
    rows); OOV ids left out."""
    n_history = len(vocab[history_field]) + 1
    doc_of_context = np.cumsum(keep) - 1  # sampled context -> document number
    docs, tokens = [], []
    parent, ids = _flat(reader.common[ids_key(history_field)])
    docs.append(doc_of_context[parent[keep[parent]]])
    tokens.append(_rows(vocab[history_field], ids[keep[parent]]))
    for g in range(reader.impressions.metadata.num_row_groups):
        table = reader.read_row_group(g, columns=[COMMON_INDEX_KEY, ids_key(item_field)])
        context = reader.index.get_indexer(table[COMMON_INDEX_KEY].to_pandas())
        parent, ids = _flat(table[ids_key(item_field)])
        ctx = context[parent]
        sampled = (ctx >= 0) & keep[np.maximum(ctx, 0)]
        docs.append(doc_of_context[ctx[sampled]])
        tokens.append(n_history + _rows(vocab[item_field], ids[sampled]))
    doc, token = np.concatenate(docs), np.concatenate(tokens)
    known = (token != 0) & (token != n_history)  # OOV buckets carry no identity
    return doc[known], token[known]


def _ppmi(doc: np.ndarray, token: np.ndarray, n_docs: int, n_tokens: int) -> tuple[Any, np.ndarray]:
    """The positive PMI matrix of tokens sharing documents (diagonal left out), and each
    token's document frequency."""
    import scipy.sparse as sp

    incidence = sp.csr_matrix(
        (np.ones(len(doc)), (doc, token)), shape=(n_docs, n_tokens), dtype=np.float64
    )
    incidence.data[:] = 1.0  # presence in a context, whatever the count
    counts = (incidence.T @ incidence).tocoo()
    frequency = np.asarray(incidence.sum(axis=0)).ravel()
    pmi = np.log(counts.data * n_docs / (frequency[counts.row] * frequency[counts.col]))
    positive = (pmi > 0) & (counts.row != counts.col)
    ppmi = sp.csr_matrix(
        (pmi[positive], (counts.row[positive], counts.col[positive])), shape=(n_tokens, n_tokens)
    )
    return ppmi, frequency


def _scaled_vectors(ppmi, seen: np.ndarray, dim: int, scale: float, seed: int) -> np.ndarray:
    """`dim` columns of the PPMI factorisation (eigenvectors times the root of their
    eigenvalues), scaled so the seen rows' entries have standard deviation `scale`."""
    n_tokens = ppmi.shape[0]
    values, vectors = _top_eigenvectors(ppmi, dim, seed)
    vectors = vectors * np.sqrt(values)
    if vectors.shape[1] < dim:  # tiny vocabularies: pad the missing dimensions with zeros
        vectors = np.hstack([vectors, np.zeros((n_tokens, dim - vectors.shape[1]))])
    spread = vectors[seen].std() if seen.any() else 0.0
    return vectors * (scale / spread if spread > 0 else 0.0)


def cooccurrence_tables(
    reader: SplitReader,
    vocab: Mapping[str, np.ndarray],
    cross: str,
    dim: int,
    scale: float,
    *,
    max_contexts: int = 200_000,
    seed: int = 0,
) -> CooccurrenceTables:
    """PPMI factorisation of the cross's history and item ids over the training contexts.

    Args:
        reader: the training split's reader; the ids are those it feeds (its `common`
            and `read_row_group`), so a reader that feeds fewer starts from what it feeds.
        vocab: per raw field, the sorted raw ids with their own row (`vocab.parquet`).
        cross: a key of `models.features.CROSSES`, e.g. "508" (109_14 x 206).
        dim: the embedding size.
        scale: the standard deviation of the returned rows' entries (over seen ids).
        max_contexts: at most this many contexts are sampled (seeded).
        seed: draws the sample and the eigensolver's start.

    Returns:
        The initial rows of both tables, which of them were seen, and the sample's size.

    Raises:
        ValueError: `cross` is not a cross of the format.
    """
    if cross not in CROSSES:
        raise ValueError(
            f"model.cooccurrence_init: unknown cross {cross!r}; one of {sorted(CROSSES)}"
        )
    start = time.perf_counter()
    history_field, item_field = CROSSES[cross]
    n_history, n_item = len(vocab[history_field]) + 1, len(vocab[item_field]) + 1
    rng = np.random.default_rng([seed, int(cross)])
    keep = _sampled_contexts(reader.common.num_rows, max_contexts, rng)
    doc, token = _documents(reader, vocab, history_field, item_field, keep)
    n_docs, n_tokens = int(keep.sum()), n_history + n_item
    ppmi, frequency = _ppmi(doc, token, n_docs, n_tokens)
    seen = frequency > 0
    vectors = _scaled_vectors(ppmi, seen, dim, scale, seed)
    return CooccurrenceTables(
        cross=cross,
        history=vectors[:n_history].astype(np.float32),
        item=vectors[n_history:].astype(np.float32),
        history_seen=seen[:n_history],
        item_seen=seen[n_history:],
        contexts=n_docs,
        seconds=time.perf_counter() - start,
    )


def initialise_from_cooccurrence(
    model: Any,
    reader: SplitReader,
    vocab: Mapping[str, np.ndarray],
    crosses: Sequence[str],
    dim: int,
    scale: float,
    seed: int,
) -> list[CooccurrenceTables]:
    """Set the seen rows of each cross's history and item tables (every tower's copy in
    ESMM-NS and BASE; both halves of a table made twice as wide by
    `model.interest_match`; `dim` = `model.embedding_dim`) from `cooccurrence_tables`."""
    # Not at the top: models.layers imports Keras, and tasks.train (which the `esmm` CLI
    # imports at start-up) imports this module.
    from models.layers import EmbeddingBag

    done = []
    for cross in crosses:
        history_field, item_field = CROSSES[cross]
        tables = cooccurrence_tables(reader, vocab, cross, dim, scale, seed=seed)
        for field, rows, seen in (
            (history_field, tables.history, tables.history_seen),
            (item_field, tables.item, tables.item_seen),
        ):
            names = {f"embedding_{field}", f"ctr_embedding_{field}", f"cvr_embedding_{field}"}
            for layer in model.layers:
                if isinstance(layer, EmbeddingBag) and layer.name in names:
                    weights = np.array(layer.embeddings.numpy())
                    # a table twice as wide (model.interest_match): both halves
                    copies = weights.shape[1] // rows.shape[1]
                    weights[seen] = np.tile(rows[seen], (1, copies))
                    layer.embeddings.assign(weights)
        done.append(tables)
    return done
