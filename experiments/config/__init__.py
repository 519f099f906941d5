"""The experiment config: schema (:mod:`.schema`), loading (:mod:`.loading`), rules (:mod:`.rules`,
:mod:`.ranges`, :mod:`.external`). The names below are the package's public API."""
from experiments.config.loading import config_keys, load_config, read_yaml, to_yaml  # noqa: F401
from experiments.config.schema import (STAGES, AugmentConfig, Config, ConfigError, DataConfig,  # noqa: F401
                                       DiffusionConfig, GenerationConfig, SegmenterConfig, TrackingConfig,
                                       TrainerConfig, ValidatorConfig)
