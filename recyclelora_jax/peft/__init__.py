"""Parameter-efficient fine-tuning: the adapted linear layer (``layers``), adapter inits
(``init``), and attaching/merging adapters on a backbone parameter tree (``params``)."""
