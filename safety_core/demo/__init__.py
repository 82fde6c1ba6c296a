"""Model organisms: a whole base -> aligned -> attacked -> anchored / restored pipeline on data
the package writes, each stage an ordinary job, so the demo exercises the users' code paths.

May import: every other subpackage of safety_core (it sits on top of them).
"""
