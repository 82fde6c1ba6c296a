"""Fine-tuning: data loading, mixing, templating and encoding, model and tokenizer loading, the DeepSpeed training
loop (with its Regularizer hook), DeepSpeed config building, checkpoints, built-in models and data.

May import: the shared modules of safety_core (args, distributed, precision, nll, progress) and kernels;
never anchor/, restore/, measure/ or demo/ (they build on this package).
"""
