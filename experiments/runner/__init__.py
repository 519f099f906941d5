"""The runner: the pipeline of cached stages, the Lightning trainer and launcher glue, the
models a stage builds, the checks before a run and the verdict after it."""
