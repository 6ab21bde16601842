"""deft's driver: decides what to score, select, label and train next. Importable without starting Ray.

    from pipeline import ActiveLearningRun, load_config
"""
from pipeline.config import Config, ConfigError, load_config
from pipeline.data import DataError, Pool, load_pool
from pipeline.loop import ActiveLearningRun, NeedsLabels
from pipeline.strategies import get_strategy, select
from pipeline.tasks import get_task

__all__ = [
    "ActiveLearningRun", "Config", "ConfigError", "DataError", "NeedsLabels", "Pool",
    "get_strategy", "get_task", "load_config", "load_pool", "select",
]
