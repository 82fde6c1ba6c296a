"""Model organisms: a whole base -> aligned -> attacked -> anchored / restored pipeline on data
the package writes, each stage an ordinary job, so the demo exercises the users' code paths.
Each organism is a study file (examples/studies/tiny.yaml, smollm2.yaml) that safety_core/study
runs; here are their data: data.py (the study's builder tiny-organism) and smollm2_data.py (the
builder smollm2-organism, from the shared public sets).

May import: every other subpackage of safety_core (it sits on top of them).
"""
