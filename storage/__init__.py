"""The database and the data folder: the only code that writes either."""
