"""The registered model: logged as code with its `.keras` file and a signature, loading its
shipped code in a fresh process (the server itself: test_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models.features import ALL_FIELDS, OUTPUT_KEYS
from tests.conftest import REPO


def test_logged_model_is_code_with_the_keras_file_and_a_signature(store):
    """Models-from-code (no pickle), the .keras file under the artifacts, pinned requirements."""
    from mlflow.artifacts import download_artifacts

    local = Path(download_artifacts(store["info"].model_uri, dst_path=str(store["root"] / "dl")))
    assert [p.name for p in local.glob("**/*.keras")] == ["model.keras"]
    assert not list(local.glob("**/*.pkl"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert (
        mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    )
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert inputs[0]["name"] == "features"
    assert sorted(inputs[0]["properties"]) == sorted(ALL_FIELDS)
    outputs = [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])]
    assert outputs == list(OUTPUT_KEYS)
    requirements = (local / "requirements.txt").read_text().split()
    assert "tensorflow==2.16.2" in requirements and "keras==3.15.1" in requirements
    assert (local / "code" / "models" / "esmm.py").is_file()


@pytest.mark.slow  # a fresh interpreter importing TensorFlow: 10-30 s on 2 cores
def test_logged_model_loads_its_own_shipped_code(store, tmp_path):
    """In a fresh process outside the repository, the model runs the code logged with it."""
    script = (
        "import mlflow, sys\n"
        f"mlflow.set_tracking_uri({store['tracking_uri']!r})\n"
        "model = mlflow.pyfunc.load_model('models:/esmm@champion')\n"
        "import serving.records\n"
        "print(serving.records.__file__)\n"
        "print(model.predict([{'features': {'101': [[5, 1.0]]}}]).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    module_file, shape = proc.stdout.strip().splitlines()[-2:]
    assert Path(module_file).parts[-3:] == ("code", "serving", "records.py")
    assert str(REPO) not in module_file
    assert shape == "(1, 3)"
