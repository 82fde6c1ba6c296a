"""Model organisms: a whole base -> aligned -> attacked -> anchored / restored pipeline on data
the package writes, each stage an ordinary job, so the demo exercises the users' code paths.
The tiny organism is the study file examples/studies/tiny.yaml (safety_core/study runs it);
here are its data (data.py, the study's builder tiny-organism) and the SmolLM2 organism's own
runner code (smollm2*.py; examples/studies/smollm2.yaml is the same organism as a study).

May import: every other subpackage of safety_core (it sits on top of them).
"""
