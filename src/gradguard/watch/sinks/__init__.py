"""Sinks: JSONL (always available), TensorBoard, Prometheus, MLflow (optional extras)."""

from .base import Sink
from .jsonl import JsonlSink, read_jsonl
from .mlflow import MlflowSink
from .prometheus import PrometheusSink
from .tensorboard import TensorBoardSink

__all__ = ["JsonlSink", "MlflowSink", "PrometheusSink", "Sink", "TensorBoardSink", "read_jsonl"]
