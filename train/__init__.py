"""Plain-PyTorch SFT trainer for refusal-token models (installed as ``rtkern.train``)."""
