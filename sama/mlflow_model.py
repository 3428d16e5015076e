"""The MLflow pyfunc model of an exported SAMA pipeline (MLflow "models from code": no pickling).

``mlflow.pyfunc.load_model(uri).predict(df)`` takes a DataFrame with columns ``video`` (a URI),
``instruction``, ``output`` (a URI for the edited mp4) and optionally ``steps``, ``cfg``, ``seed``,
and returns one report per row.
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
                    steps=int(row.get("steps") or 50),
                    cfg=float(row.get("cfg") or 5.0),
                    seed=int(row.get("seed") or 0),
                )
            )
        return reports


mlflow.models.set_model(SamaEditModel())
