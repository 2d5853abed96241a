"""dplora_core: the numerical library of dplora.

Pure PyTorch / transformers / peft code: configs, data, model loading, LoRA adapters,
DP-SGD, privacy accounting, aggregation strategies and evaluation. It never imports
prefect, mlflow or dvc; orchestration and tracking live in ``tasks/`` and ``flows/``.
"""

__version__ = "0.1.0"
