"""The pipeline stages, one module each: finetune, generate, validate, segment.

Every stage module declares ``VERSION`` and ``inputs(cfg)`` (the config values its result depends
on) next to its ``run_<stage>`` entry; :mod:`experiments.runner.pipeline` reads them from there. A stage
module never imports another one: what two stages share lives in the library or in
:mod:`experiments.runner.builders`.
"""
