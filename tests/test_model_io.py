"""The original's folder format: safe reading, validation, single and ensemble layouts, round trip."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from patchcore_lightning.memory_bank import MemoryBank
from patchcore_lightning.model_io import (
    ModelFormatError,
    PatchCoreParams,
    find_members,
    read_params,
    safe_unpickle,
    write_params,
)

from .conftest import original_params, write_original_model


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "patchcore_params.pkl"
    path.write_bytes(pickle.dumps({"backbone.name": payload}))
    with pytest.raises(ModelFormatError, match="refused to load"):
        safe_unpickle(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the plain unpickler does run it: the test's payload is real
    assert marker.exists()


def test_original_params_round_trip_and_types(tmp_path):
    raw = original_params()
    path = tmp_path / "p.pkl"
    with open(path, "wb") as handle:
        pickle.dump(raw, handle)
    params = read_params(path)
    assert params.layers == ("layer2", "layer3") and params.input_shape == (3, 64, 64)
    write_params(tmp_path / "q.pkl", params)
    with open(tmp_path / "q.pkl", "rb") as handle:
        again = pickle.load(handle)
    assert again == raw and type(again["layers_to_extract_from"]) is tuple and type(again["input_shape"]) is tuple


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("patchsize"), "missing keys \\['patchsize'\\]"),
        (lambda d: d.update(patchsize=0), "patchsize must be a positive int, got 0"),
        (lambda d: d.update(input_shape=(224, 224)), "input_shape must be"),
        (lambda d: d.update(layers_to_extract_from="layer2"), "layers_to_extract_from must be a list"),
    ],
)
def test_bad_params_name_the_problem(change, message):
    raw = original_params()
    change(raw)
    with pytest.raises(ModelFormatError, match=message):
        PatchCoreParams.from_original(raw, "x.pkl")
    with pytest.raises(ModelFormatError, match="expected a dict"):
        PatchCoreParams.from_original([1, 2], "x.pkl")


def test_single_and_ensemble_folders(tmp_path):
    bank = np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32)
    single = write_original_model(tmp_path / "single", [(original_params(), bank)])
    assert [(m.params.name, m.index.name) for m in find_members(single)] == [
        ("patchcore_params.pkl", "nnscorer_search_index.faiss")
    ]
    ensemble = write_original_model(tmp_path / "ens", [(original_params(), bank)] * 3)
    assert [m.index.name for m in find_members(ensemble)] == [
        f"Ensemble-{i}-3_nnscorer_search_index.faiss" for i in (1, 2, 3)
    ]
    loaded = MemoryBank.load(find_members(ensemble)[1].index)
    np.testing.assert_array_equal(loaded.vectors.numpy(), bank)
    (ensemble / "Ensemble-2-3_patchcore_params.pkl").unlink()
    with pytest.raises(ModelFormatError, match="missing Ensemble-2-3_patchcore_params.pkl"):
        find_members(ensemble)
    with pytest.raises(ModelFormatError, match="model folder not found"):
        find_members(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="no .faiss index"):
        find_members(tmp_path / "empty")
