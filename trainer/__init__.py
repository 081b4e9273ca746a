"""GPU work: models, LoRA DreamBooth training, generation and the worker.

This package's top level stays free of torch imports so that the bot can use the light modules
(`trainer.events`, `trainer.errors`, `trainer.runner`) without loading torch on its event loop.
"""
