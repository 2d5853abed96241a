"""The MLflow model registered for each experiment, logged as "models from code" (no pickled object).

It holds the final adapter (safetensors) and the experiment config; the base model is the one the config
names (the embedded SmolLM2 by default) and must be available where the model is loaded. Use it with:

    model = mlflow.pyfunc.load_model("models:/dplora-fpb-demo/latest")
    model.predict(["Operating profit rose to EUR 13.1 mn."])   # -> ["positive"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel, PythonModelContext

from dplora_core.config import ExperimentConfig


class DpLoraClassifier(PythonModel):
    """Texts in, label words out: the base model with the experiment's final DP-trained adapter."""

    def load_context(self, context: PythonModelContext) -> None:
        self.config = ExperimentConfig.model_validate_json(Path(context.artifacts["config"]).read_text())
        self.adapter = Path(context.artifacts["adapter"]).read_bytes()

    def predict(
        self, context: PythonModelContext, model_input: list[Any], params: dict[str, Any] | None = None
    ) -> list[str]:
        """Each input a text, or {"text": ..., "question": ...} for question-answering data like PubMedQA."""
        from tasks.training import predict_labels

        items = [x if isinstance(x, dict) else {"text": x} for x in model_input]
        questions = [str(x.get("question", "")) for x in items] if any("question" in x for x in items) else []
        return predict_labels(self.config, self.adapter, [str(x["text"]) for x in items], questions)


mlflow.models.set_model(DpLoraClassifier())
