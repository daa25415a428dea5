"""Everything that imports torch: the worker pool, runner, models and conversion, Ulysses attention,
samplers, profiling and tiny test models. Reached from the service only through the executor."""
