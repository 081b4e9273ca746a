"""The torch-free job protocol between the bot and the workers.

Typed job parameters, results and events, how they travel as JSON (`wire`), the `JobRunner`
interface with its local-process and Celery backends, the Redis names both sides use, and what a
worker needs to start. Imported by the bot and by the trainer; imports neither.
"""
