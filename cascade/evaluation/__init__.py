"""Evaluating a cascade stage by stage: sample lists and their generation (`samples`), feature networks
and reference statistics, the metrics (FID / KID / IS, precision / recall, consistency, CAS,
memorisation), sweeps of w and s, and the report writers."""
