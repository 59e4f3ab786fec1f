"""Export a trained ESMM as a TensorFlow SavedModel for TensorFlow Serving (`esmm export`).

The SavedModel is written by Keras's own `keras.export.ExportArchive` (the model's
variables and its vocabulary lookup tables are tracked with it). Its `serving_default`
signature takes one context and its candidates, as the candidate request of `esmm serve`
does (`serving.candidates`):

- for each user-side field F (`COMMON_FIELDS`): `ids_F` (int64) and `wts_F` (float32), shape
  `[entries]`: the context's raw feature ids and weights;
- for each impression-side field F (`SKELETON_FIELDS`): `ids_F` and `wts_F`, shape
  `[candidates, entries]`, each candidate's row padded with id 0 and weight 0 (padding never
  contributes; an absent field is a row of zero weights);

and returns `p_ctr`, `p_cvr` and `p_ctcvr`, shape `[candidates]`. Ids outside the
vocabulary go to its out-of-vocabulary bucket, as in the registered model. The folder also
holds `esmm_export.json`: the source model URI and the input names.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import tensorflow as tf

from models.features import (
    COMMON_FIELDS,
    CONTEXT_ROW_KEY,
    OUTPUT_KEYS,
    SKELETON_FIELDS,
    ids_key,
    wts_key,
)

SIGNATURE = "serving_default"


def export_signature() -> dict[str, tf.TensorSpec]:
    """The `serving_default` inputs: the context's entries (1-D) and the candidates' (2-D)."""
    spec: dict[str, tf.TensorSpec] = {}
    for fields, shape in ((COMMON_FIELDS, (None,)), (SKELETON_FIELDS, (None, None))):
        for f in fields:
            spec[ids_key(f)] = tf.TensorSpec(shape, tf.int64, name=ids_key(f))
            spec[wts_key(f)] = tf.TensorSpec(shape, tf.float32, name=wts_key(f))
    return spec


def export_saved_model(model: keras.Model, out: Path, source: str = "") -> Path:
    """Write `model` as a SavedModel with the context-and-candidates signature.

    Args:
        model: a trained ESMM (`models.esmm.EsmmModel`).
        out: the folder to write (created).
        source: where the model came from (e.g. `models:/esmm/3`), recorded beside it.

    Returns:
        `out`.
    """
    spec = export_signature()

    def serve(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        features = dict(inputs)
        for f in COMMON_FIELDS:  # the one context as the one user-side row
            features[ids_key(f)] = features[ids_key(f)][tf.newaxis, :]
            features[wts_key(f)] = features[wts_key(f)][tf.newaxis, :]
        candidates = tf.shape(features[ids_key(SKELETON_FIELDS[0])])[0]
        features[CONTEXT_ROW_KEY] = tf.zeros([candidates], tf.int32)
        outputs = model(features, training=False)
        return {k: tf.reshape(outputs[k], [-1]) for k in OUTPUT_KEYS}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve, input_signature=[spec])
    out = Path(out)
    archive.write_out(str(out), verbose=False)
    (out / "esmm_export.json").write_text(
        json.dumps(
            {
                "source": source,
                "signature": SIGNATURE,
                "inputs": sorted(spec),
                "outputs": list(OUTPUT_KEYS),
            },
            indent=2,
        )
    )
    return out
