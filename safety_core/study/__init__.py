"""Studies as data: one YAML file declares a study's models, data, stages (ordinary job configs of
the existing commands, reading each other's outputs as ${stages.NAME.model}), evaluation suites,
checks and plots; one runner runs any study, per seed, with resume and combine.

spec (the schema; faults: its fault lines) -> plan (references, order, metrics; sweep: a stage
over a grid, as points) -> resolve (one seed's configs) -> runner (seeds, result, sweeps) -> seed
(one seed's stages) with builders, local, evalcache, progress, metrics, report (checks,
verdicts, landscapes, table, plots). The tiny organism (`safebasin demo`) is the study file
examples/studies/tiny.yaml. May import every other subpackage of safety_core; never the launcher, which hands the
runner its job launcher and MLflow parent run.
"""
