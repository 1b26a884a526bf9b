"""Interoperability: reference checkpoints, Hugging Face folders and LLaMA tokenizers.

Reference checkpoints are those released with "Scaling up Masked Diffusion Models on Text"
(Nie et al., arXiv 2410.18514).

`smdm convert` (see smdm.interop.commands) drives these functions from the command line.
"""

from smdm.interop.hf import export_hf, from_hf, load_hf, to_hf
from smdm.interop.reference import config_from_reference, from_reference, read_reference, to_reference
from smdm.interop.state import check_vocabulary

__all__ = [
    "check_vocabulary",
    "config_from_reference",
    "export_hf",
    "from_hf",
    "from_reference",
    "load_hf",
    "read_reference",
    "to_hf",
    "to_reference",
]
