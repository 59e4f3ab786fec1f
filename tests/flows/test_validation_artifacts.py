"""The retraining flow attaches the validation reports to its Prefect run: the text summary as
a markdown artefact and a link to the self-contained HTML page (real temporary Prefect server)."""

from __future__ import annotations

import pytest

from tasks.config import PathsConfig
from tasks.layout import Layout

pytestmark = pytest.mark.timeout(300)


def test_reports_are_attached_to_the_flow_run(tmp_path, prefect_harness):
    from prefect import flow
    from prefect.artifacts import Artifact

    from flows.retrain import attach_validation_reports

    layout = Layout.from_config(PathsConfig(), root=tmp_path)
    layout.validate_dir.mkdir(parents=True)
    layout.validate_report_text.write_text("ESMM data validation: FAILED\n  - feature 'click'\n")
    layout.validate_report_html.write_text("<!doctype html><p>report</p>")

    @flow(name="attach-reports")
    def attach() -> None:
        attach_validation_reports(layout)

    attach()
    text = Artifact.get("esmm-validation-report", _sync=True)
    link = Artifact.get("esmm-validation-report-html", _sync=True)
    assert text.type == "markdown" and "feature 'click'" in text.data
    # Prefect stores a link artefact as markdown: [text](uri).
    assert f"({layout.validate_report_html.resolve().as_uri()})" in link.data
    assert text.flow_run_id is not None and text.flow_run_id == link.flow_run_id
