"""The project's small CLIP tokenizer files (vocab.json, merges.txt) and the script that builds them."""
