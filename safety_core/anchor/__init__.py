"""Safety anchoring (AsFT): the alignment basis (aligned minus base weights), the anchor
regularizer the trainer calls (autograd under ZeRO 0-2, exact sharded gradient under ZeRO-3),
and the post-hoc Safe LoRA projection.

May import: train/ (model loading, DeepSpeed config), the shared modules (args, zero3, progress,
distributed) and kernels.
"""
