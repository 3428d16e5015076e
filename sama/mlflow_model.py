"""The MLflow pyfunc model of an exported SAMA pipeline (MLflow "models from code": no pickling).

``mlflow.pyfunc.load_model(uri).predict(df)`` takes a DataFrame with columns ``video`` (a URI),
``instruction``, ``output`` (a URI for the edited mp4) and optionally ``steps``, ``cfg``, ``seed``
(absent: the export's own inference settings), and returns one report per row.
"""

from __future__ import annotations

import mlflow
import mlflow.pyfunc


class SamaEditModel(mlflow.pyfunc.PythonModel):
    """Edits videos with the pipeline stored in the model's ``pipeline`` artifact."""

    def load_context(self, context) -> None:
        self.model_dir = context.artifacts["pipeline"]

    def predict(self, context, model_input, params=None):
        from sama.edit import run_edit

        reports = []
        for row in model_input.to_dict(orient="records"):
            reports.append(
                run_edit(
                    row["video"],
                    row["instruction"],
                    self.model_dir,
                    row["output"],
                    steps=_given(row, "steps", int),
                    cfg=_given(row, "cfg", float),
                    seed=_given(row, "seed", int) or 0,
                )
            )
        return reports


def _given(row: dict, key: str, kind: type):
    """``kind(row[key])``, or None when the column is absent or empty (None / NaN)."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):
        return None
    return kind(value)


mlflow.models.set_model(SamaEditModel())
