"""Command-line front end (``trainprobe demo | report | dashboard | export | scan``)."""
