"""Studies as data: one YAML file declares a study's models, data, stages (ordinary job configs of
the existing commands, reading each other's outputs as ${stages.NAME.model}), evaluation suites,
checks and plots; one runner runs any study, per seed, with resume and combine.

spec (the schema) -> plan (references, order, metrics) -> resolve (one seed's configs) -> runner
(seeds, result) -> seed (one seed's stages) with builders, local, evalcache, progress, metrics,
report. May import every other subpackage of safety_core; never the launcher, which hands the
runner its job launcher and MLflow parent run.
"""
