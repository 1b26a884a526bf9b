"""Downstream tasks of the MDM paper: GSM8K, the reversal curse, MT-Bench and temporal shift."""
