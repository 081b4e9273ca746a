"""GPU work: models, LoRA DreamBooth training, generation and the worker loop that serves jobs.

Everything that imports torch lives here. The bot never imports this package: it talks to the
workers through the torch-free protocol in `jobs`, and a local worker process is started by name.
"""
