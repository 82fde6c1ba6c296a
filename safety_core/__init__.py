"""The science of safebasin, one subpackage per method (as peft's tuners/):

train/ (data, models, the DeepSpeed loop), anchor/ (AsFT), restore/ (curvature-aware
restoration), measure/ (generation, judges, evaluation, landscapes), demo/ (model organisms).
Modules at this level are shared by several methods. Imports go launcher -> safety_core ->
kernels; nothing here imports the launcher.
"""
