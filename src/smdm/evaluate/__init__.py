"""Evaluation: validation loss on prepared splits and, later, benchmark tasks."""
