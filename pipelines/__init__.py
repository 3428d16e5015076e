"""Ray Data jobs. All Ray calls of a job live in its module here."""
