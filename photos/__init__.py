"""Checking and normalising selfies: decoding, orientation, colour, face-aware crops, hashes.

Pure functions of bytes: nothing here writes a file or touches the database. The bot's intake and
the trainer's command line use it.
"""
